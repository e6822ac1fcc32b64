"""Opt-in load test (``pytest -m soak tests/test_soak.py -s``): a bounded loop of random calls of
every op — shapes, dtypes, masks, causal, dropout, varlen packings (empty sequences included),
backends, forward and backward — in the Triton interpreter on small shapes.

It asserts that the process's resident memory stops growing after a warm-up (growth over the
measured calls at most ``RSS_BOUND_MB``), and that mmkernels' own caches stay bounded: the GPU
autotuner registry (``kernels._launch._AUTOTUNED``, one entry per (kernel, head-dim bucket,
dtype, dot precision, TMA) — none on a CPU) and the interpreter's rewritten-kernel cache (one
per ``@triton.jit`` function).  The figures are printed for the closing note.
"""

from __future__ import annotations

import gc
import os
import random
import time

import pytest
import torch
from conftest import DEVICE

import mmkernels as mk

pytestmark = [pytest.mark.soak, pytest.mark.filterwarnings("ignore::UserWarning")]

CALLS = int(os.environ.get("MMKERNELS_SOAK_CALLS", "5000"))
WARMUP = max(1, CALLS // 10)
RSS_BOUND_MB = 64


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _t(rng, *shape, dtype):
    return torch.randn(*shape, device=DEVICE, dtype=dtype, generator=rng).requires_grad_()


def _one_call(r: random.Random, g: torch.Generator):
    dtype = r.choice([torch.float32, torch.float32, torch.bfloat16, torch.float16])
    op = r.choice(["attention", "attention_varlen", "attention_scores", "qformer", "token_pool"])
    backend = r.choice(["triton", "triton", None])
    d = r.choice([8, 16, 24])
    if op == "attention":
        b, h, lq, lk = r.randint(1, 2), r.randint(1, 2), r.randint(1, 9), r.randint(1, 9)
        q, k, v = _t(g, b, h, lq, d, dtype=dtype), _t(g, b, h, lk, d, dtype=dtype), _t(g, b, h, lk, d, dtype=dtype)
        mask = None
        if r.random() < 0.4:
            mask = torch.randn(b, 1, 1, lk, device=DEVICE, dtype=dtype, generator=g) if r.random() < 0.5 \
                else torch.rand(1, h, lq, lk, device=DEVICE, generator=g) > 0.3
        out = mk.attention(q, k, v, attn_mask=mask, is_causal=r.random() < 0.3, dropout_p=r.choice([0.0, 0.0, 0.2]),
                           backend=backend)
        inputs = (q, k, v)
    elif op == "attention_varlen":
        n = r.randint(1, 5)
        lens = [r.choice([0, 1, 3, 7, 12]) for _ in range(n)]
        cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32, device=DEVICE)
        t = sum(lens)
        q, k, v = (_t(g, t, 2, d, dtype=dtype) for _ in range(3))
        out = mk.attention_varlen(q, k, v, cu, cu, is_causal=r.random() < 0.5, dropout_p=r.choice([0.0, 0.1]),
                                  backend=backend)
        inputs = (q, k, v)
    elif op == "attention_scores":
        b, h, lq, lk = r.randint(1, 2), 2, r.randint(1, 9), r.randint(1, 9)
        q, k = (_t(g, b, h, length, d, dtype=torch.float32).detach() for length in (lq, lk))
        with torch.no_grad():
            mk.attention_scores(q, k, query_index=r.choice([None, 0, -1]), is_causal=r.random() < 0.3,
                                backend=backend if backend is None else "triton")
        return
    elif op == "qformer":
        b, lq, lk, heads = r.randint(1, 2), r.randint(1, 6), r.randint(1, 9), 2
        x, e = _t(g, b, lq, 16, dtype=dtype), _t(g, b, lk, 12, dtype=dtype)
        w = [_t(g, 16, dim, dtype=dtype) for dim in (16, 12, 12)]
        bias = [_t(g, 16, dtype=dtype) for _ in range(3)]
        out = mk.qformer_cross_attention(x, e, w[0], bias[0], w[1], bias[1], w[2], bias[2], heads,
                                         dropout_p=r.choice([0.0, 0.1]), backend=backend)
        inputs = (x, e, *w, *bias)
    else:
        side = r.choice([2, 4, 6])
        x = _t(g, r.randint(1, 2), side * side, 8, dtype=dtype)
        mode = r.choice(["avg", "max", "bilinear", "merge"])
        out = mk.token_pool(x, mode=mode, norm=r.choice([None, "layernorm", "rmsnorm"]), backend=backend,
                            output_size=(side // 2, side // 2) if mode == "bilinear" else None)
        inputs = (x,)
    torch.autograd.grad(out.float().sum(), inputs, allow_unused=True)


def test_soak_memory_and_caches_bounded():
    from mmkernels.kernels import _launch

    r = random.Random(1234)
    g = torch.Generator(device=DEVICE).manual_seed(1234)
    start = time.time()
    for _ in range(WARMUP):
        _one_call(r, g)
    gc.collect()
    rss0 = _rss_mb()
    samples = []
    for i in range(CALLS - WARMUP):
        _one_call(r, g)
        if i % 500 == 0:
            gc.collect()
            samples.append(round(_rss_mb(), 1))
            print(f"[soak] {WARMUP + i} calls, {time.time() - start:.0f} s, RSS {samples[-1]} MB", flush=True)
    gc.collect()
    rss1 = _rss_mb()
    autotuned = len(_launch._AUTOTUNED)
    print(f"\n[soak] {CALLS} calls in {time.time() - start:.0f} s; RSS after {WARMUP} warm-up calls {rss0:.1f} MB, "
          f"at the end {rss1:.1f} MB (growth {rss1 - rss0:+.1f} MB; samples {samples}); "
          f"autotuner registry {autotuned} entries")
    assert rss1 - rss0 <= RSS_BOUND_MB, f"resident memory grew by {rss1 - rss0:.1f} MB after warm-up"
    assert autotuned <= 64

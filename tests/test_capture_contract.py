"""The CUDA-graph capture contract of ``mk.attention_varlen`` (issue 17 item 3): ``out=`` writes
into the caller's buffer; padded metadata (trailing zero-length sequences, ``cu_seqlens`` longer
than the real count, unused tail rows, loose ``max_seqlen`` hints) gives bit-identical results
for the real rows and 0 in the tail; nothing outside the given tensors is read or written; no
allocation's size depends on tensor values; no host read.  Triton runs in the interpreter here;
the capture itself is the GPU test at the end."""

from __future__ import annotations

import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mmkernels as mk
from helpers import poisoned

H, HKV, D = 4, 2, 72


def _packing(lengths, total, seed=0, dtype=torch.float32, d=D, hkv=HKV, h=H):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(total, h, d, generator=g).to(dtype)
    k = torch.randn(total, hkv, d, generator=g).to(dtype)
    v = torch.randn(total, hkv, d, generator=g).to(dtype)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, cu


def _rotary(total, d=D):
    ang = torch.randn(total, d // 2)
    return torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)


def _padded(cu, extra_seqs):
    return torch.cat([cu, cu[-1:].repeat(extra_seqs)])


LENGTHS = [17, 1, 40, 0, 33]  # 91 real rows
REAL = sum(LENGTHS)


@pytest.mark.parametrize("backend", ["triton", "sdpa"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("tail,extra,hint", [(0, 3, None), (29, 0, None), (29, 4, 40), (150, 2, 40), (7, 1, 64)])
def test_padded_metadata_is_bit_identical(backend, causal, tail, extra, hint):
    """Real rows bit-identical to the unpadded call (Triton; SDPA equal to rounding: a larger
    dense mask), tail rows 0, every element written (poisoned buffers).  ``tail=150`` with a
    hint of 40 is a padding tail longer than the hint (the hinted grid's tail programs)."""
    q, k, v, cu = _packing(LENGTHS, REAL + tail)
    rot = _rotary(REAL + tail)
    kw = dict(is_causal=causal, enable_gqa=True, backend=backend)
    base = mk.attention_varlen(q[:REAL], k[:REAL], v[:REAL], cu, cu, rotary=tuple(t[:REAL] for t in rot), **kw)
    cu_pad = _padded(cu, extra)
    with poisoned():
        got = mk.attention_varlen(q, k, v, cu_pad, cu_pad, max_seqlen_q=hint, max_seqlen_k=hint, rotary=rot, **kw)
    if backend == "triton":
        assert torch.equal(got[:REAL], base)
    else:
        torch.testing.assert_close(got[:REAL], base, rtol=1e-6, atol=1e-6)
    assert torch.equal(got[REAL:], torch.zeros_like(got[REAL:]))


def test_many_sequences_with_tail():
    """More sequences than the in-kernel scan handles (the tile map), 260 windows of 1-2 rows plus
    empty padding sequences and a tail, with and without the hint."""
    lengths = [1 + (i % 2) for i in range(260)]
    real = sum(lengths)
    q, k, v, cu = _packing(lengths, real + 45, hkv=1, h=1, d=16)
    base = mk.attention_varlen(q[:real], k[:real], v[:real], cu, cu, backend="triton")
    cu_pad = _padded(cu, 5)
    for hint in (None, 3):
        with poisoned():
            got = mk.attention_varlen(q, k, v, cu_pad, cu_pad, max_seqlen_q=hint, max_seqlen_k=hint, backend="triton")
        assert torch.equal(got[:real], base)
        assert not got[real:].any()


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padded_metadata_backward(dtype, dropout):
    """Gradients of the real rows bit-identical to the unpadded call (dropout: the same seed
    draws the same mask, keyed by sequence index); the tail's dQ, dK, dV are 0; the keys and
    queries of the tail differ between q and k (ragged tails: 29 query rows, 12 key rows)."""
    lq, lk = [17, 40, 0, 9], [30, 25, 6, 0]
    rq, rk = sum(lq), sum(lk)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(rq + 29, H, D, generator=g).to(dtype)
    k = torch.randn(rk + 12, HKV, D, generator=g).to(dtype)
    v = torch.randn(rk + 12, HKV, D, generator=g).to(dtype)
    do = torch.randn(rq + 29, H, D, generator=g).to(dtype)
    cu_q = torch.tensor([0, *torch.tensor(lq).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lk).cumsum(0).tolist()], dtype=torch.int32)

    def run(q, k, v, do, cq, ck):
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        torch.manual_seed(11)
        out = mk.attention_varlen(q, k, v, cq, ck, dropout_p=dropout, enable_gqa=True, backend="triton")
        out.backward(do)
        return out, q.grad, k.grad, v.grad

    base = run(q[:rq], k[:rk], v[:rk], do[:rq], cu_q, cu_k)
    with poisoned():
        got = run(q, k, v, do, _padded(cu_q, 2), _padded(cu_k, 2))
    for name, b, t, real in zip(("out", "dq", "dk", "dv"), base, got, (rq, rq, rk, rk)):
        assert torch.equal(t[:real], b), name
        assert not t[real:].any(), name


def test_out_writes_the_callers_buffer_only():
    """``out=`` a strided, misaligned (bf16, odd offset) view inside a larger poisoned buffer:
    the result lands there, bit-identical to the plain call, and no byte around it changes;
    the inputs too are views with poisoned (NaN) neighbours the kernels must never read."""
    total = REAL + 10
    big = torch.randn(total + 6, H + 1, D + 5).to(torch.bfloat16)  # NaN guard rows around q
    big[:3] = float("nan")
    big[total + 3:] = float("nan")
    big[:, H:] = float("nan")
    big[..., D:] = float("nan")
    q = big[3:total + 3, :H, :D]
    _, k, v, cu = _packing(LENGTHS, total, dtype=torch.bfloat16)
    cu = _padded(cu, 1)
    plain = mk.attention_varlen(q, k, v, cu, cu, enable_gqa=True, backend="triton")
    assert not plain.isnan().any()
    buf = torch.full((total + 2, H, D + 3), float("nan"), dtype=torch.bfloat16)
    out = buf[1:total + 1, :, 3:D + 3]
    before = buf.clone()
    res = mk.attention_varlen(q, k, v, cu, cu, enable_gqa=True, backend="triton", out=out)
    assert res is out
    assert torch.equal(out, plain)
    written = torch.zeros_like(buf, dtype=torch.bool)
    written[1:total + 1, :, 3:D + 3] = True
    assert torch.equal(buf[~written].view(torch.int16), before[~written].view(torch.int16))


@pytest.mark.parametrize("backend", ["triton", "sdpa", "reference"])
@pytest.mark.parametrize("dv", [D, 48, 96])
def test_out_every_backend_and_value_width(backend, dv):
    """Every backend honours ``out=`` (Dv < D: the kernel's padded result copied; Dv > D: the
    kernel writes directly), causal NaN rules included."""
    q, k, v, cu = _packing(LENGTHS, REAL + 5)
    v = torch.randn(REAL + 5, HKV, dv)
    k[20, 1, 3] = float("nan")  # sequence 2 (rows 18..57) gets NaN in kv head 1, as per-sequence SDPA
    cu = _padded(cu, 2)
    kw = dict(is_causal=True, enable_gqa=True, backend=backend)
    plain = mk.attention_varlen(q, k, v, cu, cu, **kw)
    out = torch.full((REAL + 5, H, dv), 7.0)
    res = mk.attention_varlen(q, k, v, cu, cu, out=out, **kw)
    assert res is out
    torch.testing.assert_close(out, plain, equal_nan=True, rtol=0, atol=0)
    assert out[18:58, 2:].isnan().all() and not out[:18].isnan().any() and not out[REAL:].any()


class _Recorder(TorchDispatchMode):
    """Every aten op's name and output shapes; flags host reads (``_local_scalar_dense``)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        res = func(*args, **(kwargs or {}))
        outs = res if isinstance(res, (tuple, list)) else (res,)
        self.ops.append((str(func), tuple(tuple(o.shape) for o in outs if isinstance(o, torch.Tensor))))
        return res


@pytest.mark.parametrize("backend", ["triton", "sdpa"])
@pytest.mark.parametrize("causal", [False, True])
def test_no_value_dependent_allocation_and_no_host_read(backend, causal, monkeypatch):
    """Two calls with the same shapes and different ``cu_seqlens`` values (a full packing; most
    rows padding) run the same aten ops with the same output shapes, and none reads a value on
    the host.  (CPU tensors: the eager host check of the values is switched off, as it is for
    CUDA tensors.)"""
    op = sys.modules["mmkernels.ops.attention_varlen"]
    monkeypatch.setattr(op, "_host_checks_values", lambda t: False)
    q, k, v, cu = _packing([30, 40, 21], 91)
    cu2 = torch.tensor([0, 5, 5, 12], dtype=torch.int32)
    logs = []
    for c in (cu, cu2):
        out = torch.empty(91, H, D)
        with torch.no_grad(), _Recorder() as rec:
            mk.attention_varlen(q, k, v, c, c, max_seqlen_q=64, max_seqlen_k=64, is_causal=causal,
                                enable_gqa=True, backend=backend, out=out)
        logs.append(rec.ops)
    assert logs[0] == logs[1]
    assert not [op for op, _ in logs[0] if "_local_scalar_dense" in op or "item" in op]


def test_compiled_with_out_fullgraph():
    q, k, v, cu = _packing(LENGTHS, REAL + 9)
    cu = _padded(cu, 3)

    def f(q, k, v, cu, out):
        return mk.attention_varlen(q, k, v, cu, cu, max_seqlen_q=64, max_seqlen_k=64, enable_gqa=True, out=out)

    out_e, out_c = torch.empty(REAL + 9, H, D), torch.empty(REAL + 9, H, D)
    with torch.no_grad():
        f(q, k, v, cu, out_e)
        torch.compile(f, fullgraph=True)(q, k, v, cu, out_c)
    assert torch.equal(out_c, out_e)
    assert not out_e[REAL:].any()


def test_bad_out_and_cu_seqlens_raise():
    q, k, v, cu = _packing(LENGTHS, REAL + 4)
    kw = dict(enable_gqa=True)
    with pytest.raises(ValueError, match=r"out: expected shape \(95, 4, 72\)"):
        mk.attention_varlen(q, k, v, cu, cu, out=torch.empty(95, H, D + 1), **kw)
    with pytest.raises(ValueError, match="out: expected shape.*float32"):
        mk.attention_varlen(q, k, v, cu, cu, out=torch.empty(95, H, D, dtype=torch.float16), **kw)
    with pytest.raises(ValueError, match="out: .*does not support autograd"):
        mk.attention_varlen(q.requires_grad_(), k, v, cu, cu, out=torch.empty(95, H, D), **kw)
    q = q.detach()
    with pytest.raises(ValueError, match="out: expected a buffer whose elements do not overlap"):
        mk.attention_varlen(q, k, v, cu, cu, out=torch.empty(1, 1, D).expand(95, H, D), **kw)
    with pytest.raises(ValueError, match="out: shares memory with query"):
        mk.attention_varlen(q, k, v, cu, cu, out=q, **kw)
    bad = cu.clone()
    bad[-1] = REAL + 5
    with pytest.raises(ValueError, match=r"cu_seqlens_q: last entry must be at most the packed length 95"):
        mk.attention_varlen(q, k, v, bad, cu, **kw)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_capture_and_replay():
    """Capture once with buffers for 2048 rows, replay with three different packings written into
    the same tensors: each replay equals an eager call on the real rows, tail 0."""
    dev, dt, cap = "cuda", torch.bfloat16, 2048
    q = torch.zeros(cap, 16, 80, device=dev, dtype=dt)
    k, v = torch.zeros_like(q), torch.zeros_like(q)
    cu = torch.zeros(9, dtype=torch.int32, device=dev)
    out = torch.empty_like(q)
    with torch.no_grad():
        for _ in range(2):  # warm-up: autotuning and compilation outside the capture
            mk.attention_varlen(q, k, v, cu, cu, max_seqlen_q=1024, max_seqlen_k=1024, out=out)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            mk.attention_varlen(q, k, v, cu, cu, max_seqlen_q=1024, max_seqlen_k=1024, out=out)
        for lengths in ([1024, 1024], [256] * 7, [1000, 3, 500]):
            real = sum(lengths)
            vals = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
            cu.copy_(torch.cat([vals, vals[-1:].repeat(9 - len(vals))]))
            for t in (q, k, v):
                t.copy_(torch.randn_like(t))
            graph.replay()
            expect = mk.attention_varlen(q[:real], k[:real], v[:real], cu[:len(vals)], cu[:len(vals)])
            assert torch.equal(out[:real], expect)
            assert not out[real:].any()


def test_opcheck_out_op():
    """The mutating op behind ``out=`` (schema, fake, in-place write) on a strided ``out`` and
    padded metadata."""
    q, k, v, cu = _packing(LENGTHS, REAL + 6)
    cu = _padded(cu, 2)
    out = torch.empty(H, REAL + 6, D).transpose(0, 1)
    op = torch.ops.mmkernels.attention_varlen_fwd_out.default
    torch.library.opcheck(op, (q, k, v, cu, cu, None, None, None, 64, 64, 0.0, True, 0.2, out))


@pytest.mark.parametrize("backend", ["triton", "sdpa"])
@pytest.mark.parametrize("layout", ["transposed", "step", "offset"])
def test_out_layouts(layout, backend):
    """``out`` in the layouts tests/test_strides.py drives for inputs (its driver compares
    gradients, which ``out=`` does not support): a transposed storage, every other element of a
    poisoned buffer, a storage offset of 5 elements (no 16-byte alignment); the result equals the
    plain call and the poisoned gaps stay untouched."""
    q, k, v, cu = _packing(LENGTHS, REAL)
    n = (REAL, H, D)
    if layout == "transposed":
        buf = torch.full((REAL, D, H), float("nan"))
        out = buf.transpose(1, 2)
    elif layout == "step":
        buf = torch.full((REAL, H, 2 * D), float("nan"))
        out = buf[..., ::2]
    else:
        buf = torch.full((REAL * H * D + 5,), float("nan"))
        out = buf[5:].view(n)
    plain = mk.attention_varlen(q, k, v, cu, cu, enable_gqa=True, backend=backend)
    with torch.no_grad():
        res = mk.attention_varlen(q, k, v, cu, cu, enable_gqa=True, backend=backend, out=out)
    assert res is out and torch.equal(out, plain)
    if layout == "step":
        assert buf[..., 1::2].isnan().all()
    if layout == "offset":
        assert buf[:5].isnan().all()

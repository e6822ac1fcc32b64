"""Benchmark cases for packed vision attention (``mmkernels.attention_varlen``), standalone.

The cases the ``mmkernels bench attention --preset qwen2vl|qwen25vl`` presets are meant to run
(to be folded into the CLI), as plain functions:

* :func:`qwen2vl_mixed_images` — Qwen2-VL's ViT on 8 packed images of mixed sizes (256–4096
  patches each), 16 heads of 80: one sequence per image.
* :func:`qwen25vl_windows` — Qwen2.5-VL's ViT on one 1,000×2,500 px image: resized to multiples
  of 28 px (1,008×2,492 → 72×178 patches of 14 px, 12,816 tokens), windowed blocks attend within
  112-px windows (8×8 patches = 64 tokens, edge windows smaller: 207 windows), full blocks
  (layers 7, 15, 23, 31) over the whole image.
* :func:`implementations` — the competitors, each ``fn(q, k, v, cu, lengths) -> out`` on the
  packed (total, H, D) layout: ``mmkernels`` varlen (rotary fused), HF's per-image SDPA loop
  (what transformers runs for sdpa: host split + one call per sequence), one SDPA call with a
  dense block-diagonal mask, FlexAttention with a document mask, and ``flash_attn_varlen_func``
  when importable.  The HF-style variants apply the vision RoPE in torch first, as HF does.

Measured per case and mode (``fwd``, ``fwd+bwd``): median ms, TFLOP/s (4·Σ Lq·Lk·H·D for the
forward, ×3.5 with the backward), peak extra memory, CUDA kernel launches per layer (profiler,
GPU only), and the max abs difference to the per-image loop.

Run::

    python examples/varlen_bench.py --json varlen.json          # a GPU, bf16
    python examples/varlen_bench.py --tiny                      # tiny shapes on a CPU (smoke test)

On a CPU without ``TRITON_INTERPRET=1`` mmkernels runs its block-diagonal SDPA fallback; the
numbers are then a smoke test, not a benchmark.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import mmkernels as mk
from mmkernels.reference.attention_varlen import apply_rotary


@dataclass(frozen=True)
class Case:
    name: str
    lengths: tuple[int, ...]   # tokens per packed sequence (image, frame or window)
    heads: int = 16
    head_dim: int = 80
    note: str = ""

    @property
    def total(self) -> int:
        return sum(self.lengths)

    def flops(self, backward: bool) -> float:
        fwd = 4.0 * sum(n * n for n in self.lengths) * self.heads * self.head_dim
        return fwd * (3.5 if backward else 1.0)


# ----------------------------------------------------------------------------- cases
def qwen2vl_mixed_images(tiny: bool = False) -> Case:
    """8 images of 256–4096 patches (e.g. 224² to 896² px at 14 px patches), one sequence each."""
    if tiny:
        return Case("qwen2vl-mixed-tiny", (5, 17, 33, 1), heads=2, head_dim=80)
    return Case("qwen2vl-mixed", (256, 576, 1024, 1296, 2304, 3136, 4096, 784),
                note="8 images, 256-4096 patches, 16 heads x 80")


def _qwen25_window_lengths(height_px: int, width_px: int, patch: int = 14, merge: int = 2,
                           window_px: int = 112) -> tuple[int, ...]:
    """Qwen2.5-VL's window sizes (in patches) for one image: the image is resized to multiples
    of patch·merge, windows tile the merged grid by window_px/(patch·merge) units."""
    unit = patch * merge
    gh, gw = round(height_px / unit), round(width_px / unit)  # merged units
    win = window_px // unit
    return tuple(min(win, gh - i) * min(win, gw - j) * merge * merge
                 for i in range(0, gh, win) for j in range(0, gw, win))


def qwen25vl_windows(tiny: bool = False) -> tuple[Case, Case]:
    """(windowed blocks, full blocks) for one 1,000×2,500 px image."""
    if tiny:
        lengths = _qwen25_window_lengths(140, 200)
        return (Case("qwen25vl-windows-tiny", lengths, heads=2, head_dim=80),
                Case("qwen25vl-full-tiny", (sum(lengths),), heads=2, head_dim=80))
    lengths = _qwen25_window_lengths(1000, 2500)
    return (Case("qwen25vl-windows", lengths, note=f"1000x2500 px: {len(lengths)} windows of <= 64 tokens"),
            Case("qwen25vl-full", (sum(lengths),), note="full-attention blocks 7, 15, 23, 31"))


def make_inputs(case: Case, device, dtype, requires_grad: bool):
    total, h, d = case.total, case.heads, case.head_dim
    q, k, v = (torch.randn(total, h, d, device=device, dtype=dtype, requires_grad=requires_grad) for _ in range(3))
    cu = torch.tensor((0,) + tuple(torch.tensor(case.lengths).cumsum(0).tolist()), dtype=torch.int32, device=device)
    freqs = torch.randn(total, d // 2, device=device) * 3
    emb = torch.cat((freqs, freqs), -1)
    return q, k, v, cu, (emb.cos(), emb.sin())


# ----------------------------------------------------------------------------- implementations
def _mk_varlen(q, k, v, cu, rot, case):
    return mk.attention_varlen(q, k, v, cu, cu, max_seqlen_q=max(case.lengths), max_seqlen_k=max(case.lengths),
                               rotary=rot)


def _hf_loop(q, k, v, cu, rot, case):
    """transformers' non-flash vision path: RoPE in torch, host split, one SDPA per sequence."""
    q, k = apply_rotary(q, *rot), apply_rotary(k, *rot)
    lengths = (cu[1:] - cu[:-1]).tolist()  # the host sync HF does
    outs = [F.scaled_dot_product_attention(a.transpose(0, 1)[None], b.transpose(0, 1)[None], c.transpose(0, 1)[None])
            [0].transpose(0, 1) for a, b, c in zip(q.split(lengths), k.split(lengths), v.split(lengths))]
    return torch.cat(outs)


def _dense_mask(q, k, v, cu, rot, case):
    """One SDPA call with a (total, total) block-diagonal bool mask."""
    q, k = apply_rotary(q, *rot), apply_rotary(k, *rot)
    seg = torch.searchsorted(cu[1:], torch.arange(q.shape[0], device=q.device, dtype=cu.dtype), right=True)
    mask = seg[:, None] == seg[None, :]
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                         attn_mask=mask)
    return out[0].transpose(0, 1)


_FLEX: dict = {}


def _flex(q, k, v, cu, rot, case):
    """FlexAttention with a document mask (block mask built once per case, compiled kernel)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    key = (case, q.device.type)
    if key not in _FLEX:
        seg = torch.searchsorted(cu[1:], torch.arange(q.shape[0], device=q.device, dtype=cu.dtype), right=True)
        block = create_block_mask(lambda b, h, i, j: seg[i] == seg[j], None, None, q.shape[0], q.shape[0],
                                  device=q.device)
        _FLEX[key] = (block, torch.compile(flex_attention))
    block, fn = _FLEX[key]
    q, k = apply_rotary(q, *rot), apply_rotary(k, *rot)
    return fn(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], block_mask=block)[0] \
        .transpose(0, 1)


def _flash_varlen(q, k, v, cu, rot, case):
    from flash_attn import flash_attn_varlen_func

    q, k = apply_rotary(q, *rot), apply_rotary(k, *rot)
    m = max(case.lengths)
    return flash_attn_varlen_func(q, k, v, cu, cu, m, m)


def implementations(device: str) -> dict:
    """name → fn(q, k, v, cu, rotary, case); flash-attn only when importable, on CUDA."""
    impls = {"mmkernels-varlen": _mk_varlen, "hf-sdpa-loop": _hf_loop, "sdpa-dense-mask": _dense_mask,
             "flex-document-mask": _flex}
    if device == "cuda":
        try:
            import flash_attn  # noqa: F401

            impls["flash-attn-varlen"] = _flash_varlen
        except ImportError:
            pass
    return impls


# ----------------------------------------------------------------------------- measuring
def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _time(fn, device, reps):
    fn()
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _launches(fn, device):
    if device != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        _sync(device)
    return sum(1 for e in prof.events() if e.device_type.name == "CUDA")


def run_case(case: Case, device: str, dtype, reps: int, only=None) -> dict:
    rows: dict = {}
    impls = {n: f for n, f in implementations(device).items() if only is None or n in only}
    for mode in ("fwd", "fwd+bwd"):
        backward = mode == "fwd+bwd"
        q, k, v, cu, rot = make_inputs(case, device, dtype, backward)
        do = torch.randn_like(q) if backward else None
        baseline = _hf_loop(q, k, v, cu, rot, case).detach()
        for name, impl in impls.items():
            def call(impl=impl):
                out = impl(q, k, v, cu, rot, case)
                if backward:
                    torch.autograd.grad(out, (q, k, v), do)
                return out

            try:
                with torch.no_grad() if not backward else torch.enable_grad():
                    diff = float((call().detach().float() - baseline.float()).abs().max())
                    if device == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                        base_mem = torch.cuda.memory_allocated()
                    ms = _time(call, device, reps)
                    peak = (torch.cuda.max_memory_allocated() - base_mem) / 2**20 if device == "cuda" else None
                    launches = _launches(call, device)
            except Exception as exc:  # an implementation this machine cannot run: say why
                rows.setdefault(mode, {})[name] = {"skipped": f"{type(exc).__name__}: {str(exc)[:200]}"}
                continue
            rows.setdefault(mode, {})[name] = {
                "ms": ms, "tflops": case.flops(backward) / ms / 1e9, "peak_mib": peak, "launches": launches,
                "max_abs_diff_vs_hf_loop": diff,
            }
        ref_ms = rows[mode].get("hf-sdpa-loop", {}).get("ms")
        for row in rows[mode].values():
            if "ms" in row and ref_ms:
                row["speedup_vs_hf_loop"] = ref_ms / row["ms"]
    return {"case": asdict(case), "total_tokens": case.total, "sequences": len(case.lengths), "modes": rows}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes, float32 (CPU smoke test)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="bfloat16 (GPU default) | float16 | float32 (tiny default)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--impls", default=None, help="comma-separated subset of the implementations to run")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float32 if args.tiny else torch.bfloat16)
    reps = args.reps or (2 if args.tiny else 20)
    only = set(args.impls.split(",")) if args.impls else None
    windows, full = qwen25vl_windows(args.tiny)
    cases = [qwen2vl_mixed_images(args.tiny), windows, full]
    record = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "dtype": str(dtype),
              "torch": torch.__version__, "tiny": args.tiny, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "cases": [run_case(c, args.device, dtype, reps, only) for c in cases]}
    for res in record["cases"]:
        print(f"{res['case']['name']}: {res['sequences']} sequences, {res['total_tokens']} tokens")
        for mode, rows in res["modes"].items():
            for name, row in rows.items():
                if "skipped" in row:
                    print(f"  {mode:8s} {name:20s} skipped ({row['skipped'][:80]})")
                else:
                    extra = f" launches {row['launches']}" if row["launches"] is not None else ""
                    mem = f" peak {row['peak_mib']:.0f} MiB" if row["peak_mib"] is not None else ""
                    print(f"  {mode:8s} {name:20s} {row['ms']:9.3f} ms {row['tflops']:7.2f} TFLOP/s"
                          f" x{row.get('speedup_vs_hf_loop', math.nan):5.2f} vs loop{mem}{extra}"
                          f" |diff| {row['max_abs_diff_vs_hf_loop']:.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
    return record


if __name__ == "__main__":
    main()

"""Token-pruning benchmark: eager ``output_attentions`` scoring vs mmkernels, time and peak memory.

Two measurements per preset, each case in a fresh child process (so one case's freed memory
cannot hide the next one's peak):

* **scoring layer** — one causal attention layer that must also say how much attention each key
  receives from the last token (FastV's rule).  ``eager``: what HF's eager attention does with
  ``output_attentions=True`` — softmax(QKᵀ) as a (B, H, L, L) tensor, times V, then its last row
  averaged over heads.  ``mk``: ``mk.attention(..., return_scores=dict(query_index=-1))``.
* **prefill** — a LLaVA model (tiny CLIP tower, language model at the preset's real width, few
  layers by default) over one prompt: ``eager+attn`` (``attn_implementation="eager"``,
  ``output_attentions=True``: how eager FastV implementations get their scores), ``mk``
  (``mk.patch``), ``mk+FastV`` (``mk.patch(prune=mk.FastV(layer=2, keep=0.5))``).

Presets: ``llava15`` (LLaMA-7B heads: 32 × 128, 576 image + 64 text tokens), ``llava-ov`` (Qwen2-7B
heads: 28 query / 4 key-value × 128, 4 images × 729 + 64 text tokens), ``tiny`` (a smoke run).
Peak memory: CUDA ``max_memory_allocated`` above the inputs; CPU the process's resident-set peak
(``VmHWM``, reset through ``/proc/self/clear_refs``) above the inputs, with glibc told to mmap
every block >= 64 KiB (``MALLOC_MMAP_THRESHOLD_``) so freed tensors leave the resident set.  On a CPU without
``TRITON_INTERPRET``, ``mk`` runs its CPU backends (SDPA + the row-chunked reference scores).

    python examples/prune_bench.py --preset llava15 --layers 2          # CPU or GPU
    python examples/prune_bench.py --tiny                               # seconds, CPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

PRESETS = {
    "llava15": dict(lm="llama", heads=32, kv_heads=32, head_dim=128, hidden=4096, inter=11008, images=1, side=24,
                    text=64),
    "llava-ov": dict(lm="qwen2", heads=28, kv_heads=4, head_dim=128, hidden=3584, inter=18944, images=4, side=27,
                     text=64),
    "tiny": dict(lm="llama", heads=4, kv_heads=2, head_dim=16, hidden=64, inter=128, images=2, side=4, text=9),
}


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


class _Peak:
    """Peak memory above the current level, in MiB, for the block."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self.base = _rss_kb("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = _rss_kb("VmHWM") * 1024
        self.mib = (peak - self.base) / 2**20


def _timed(fn, device, reps):
    import torch

    times = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


# --------------------------------------------------------------------------------------
# cases (run in the child)
# --------------------------------------------------------------------------------------
def _scoring_case(p, impl, device, dtype, reps):
    import torch

    import mmkernels as mk

    length = p["images"] * p["side"] ** 2 + p["text"]
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, p["heads"], length, p["head_dim"], device=device, dtype=dtype, generator=g)
    k = torch.randn(1, p["kv_heads"], length, p["head_dim"], device=device, dtype=dtype, generator=g)
    v = torch.randn_like(k)
    scale = p["head_dim"] ** -0.5

    def eager():
        rep = p["heads"] // p["kv_heads"]
        kk, vv = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)   # HF eager's repeat_kv
        s = (q @ kk.transpose(-2, -1)) * scale
        causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
        w = torch.softmax(s.masked_fill(~causal, float("-inf")), dim=-1, dtype=torch.float32).to(dtype)
        return w @ vv, w[:, :, -1].float().mean(1)

    def fused():
        return mk.attention(q, k, v, is_causal=True, enable_gqa=True, return_scores=dict(query_index=-1))

    fn = eager if impl == "eager" else fused
    with torch.no_grad():
        fn()  # warm-up: one-time imports and caches stay out of the peak
        with _Peak(device) as peak:
            out, scores = fn()
        ms = _timed(fn, device, reps)
    return dict(tokens=length, ms=ms, peak_mib=peak.mib, scores_shape=list(scores.shape))


def _prefill_case(p, impl, device, dtype, reps, layers):
    import torch
    import transformers

    import mmkernels as mk

    text = dict(model_type=p["lm"], hidden_size=p["hidden"], intermediate_size=p["inter"],
                num_hidden_layers=layers, num_attention_heads=p["heads"], num_key_value_heads=p["kv_heads"],
                head_dim=p["head_dim"], vocab_size=1024, max_position_embeddings=16384)
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=2 * p["side"], patch_size=2, projection_dim=32)
    cfg = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=1023,
                                   vision_feature_layer=-1, image_seq_length=p["side"] ** 2)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlavaForConditionalGeneration(cfg).to(dtype).eval()
    n_img = p["images"] * p["side"] ** 2
    ids = torch.randint(2, 1000, (1, n_img + p["text"]), device=device)
    ids[0, 5:5 + n_img] = 1023
    pix = torch.randn(p["images"], 3, 2 * p["side"], 2 * p["side"], device=device, dtype=dtype)
    kwargs = dict(input_ids=ids, pixel_values=pix, use_cache=False, logits_to_keep=1)
    if impl == "eager+attn":
        model.set_attn_implementation("eager")
        kwargs["output_attentions"] = True
    elif impl == "mk":
        mk.patch(model)
    else:
        mk.patch(model, prune=mk.FastV(layer=min(2, layers - 1), keep=0.5))
    with torch.no_grad():
        model(**kwargs)  # warm-up
        with _Peak(device) as peak:
            model(**kwargs)
        ms = _timed(lambda: model(**kwargs), device, reps)
    return dict(tokens=ids.shape[1], ms=ms, peak_mib=peak.mib)


def _child(spec: dict) -> dict:
    import torch

    device = spec["device"]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    p = PRESETS[spec["preset"]]
    if spec["what"] == "scoring":
        res = _scoring_case(p, spec["impl"], device, dtype, spec["reps"])
    else:
        res = _prefill_case(p, spec["impl"], device, dtype, spec["reps"], spec["layers"])
    return dict(spec, **res, dtype=str(dtype).replace("torch.", ""))


# --------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------
def _run_child(spec: dict, isolate: bool = True) -> dict:
    if not isolate:  # --tiny: a smoke run of every code path, in this process
        return _child(spec)
    # glibc keeps freed heap memory resident, so a later allocation could reuse it without raising
    # the RSS peak: every block >= 64 KiB is mmapped instead, and unmapped when torch frees it
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return dict(spec, error=(proc.stderr.strip().splitlines() or ["failed"])[-1])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", action="append", choices=sorted(PRESETS), help="repeatable; default llava15")
    ap.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers in the prefill model (default 2)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--skip-prefill", action="store_true")
    ap.add_argument("--tiny", action="store_true",
                    help="smoke run: tiny preset on CPU, one repetition, in this process (memory figures not isolated)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        print(json.dumps(_child(json.loads(args.child))))
        return 0
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    presets = args.preset or ["llava15"]
    reps, layers = args.reps, args.layers
    if args.tiny:
        presets, device, reps, layers = ["tiny"], "cpu", 1, 3
    results = []
    for preset in presets:
        for impl in ("eager", "mk"):
            results.append(_run_child(dict(what="scoring", preset=preset, impl=impl, device=device, reps=reps),
                                      not args.tiny))
        if not args.skip_prefill:
            for impl in ("eager+attn", "mk", "mk+FastV"):
                results.append(_run_child(dict(what="prefill", preset=preset, impl=impl, device=device, reps=reps,
                                               layers=layers), not args.tiny))
    print(f"device={device}  interpreter={os.environ.get('TRITON_INTERPRET', '0')}  torch={torch.__version__}")
    print("| what | preset | tokens | implementation | ms (median) | peak MiB above inputs |")
    print("|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['what']} | {r['preset']} | | {r['impl']} | error: {r['error']} | |")
            continue
        what = r["what"] + (f" ({r['layers']} layers)" if r["what"] == "prefill" else "")
        print(f"| {what} | {r['preset']} | {r['tokens']} | {r['impl']} | {r['ms']:.1f} | {r['peak_mib']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())

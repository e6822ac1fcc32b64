"""End-to-end example and benchmark: ``mmkernels.patch(model)`` on real-size VLM front ends.

Two models, built from configs with random weights (no downloads), each timed in three variants —
``patched`` (HF sdpa model + ``mk.patch``), HF ``eager`` and HF ``sdpa`` (``attn_implementation``):

* ``blip2``: BLIP-2's image → Q-Former features (``Blip2Model.get_qformer_features``): EVA ViT-g
  (39 layers, hidden 1408, 16 heads of 88, 257 tokens) in bfloat16, the Q-Former (768 / 12 heads,
  32 queries, cross-attention to the 257 image tokens) in float32 as HF keeps it, B = 32; a small
  OPT stands in for the LM (it is not on this path).  Modes: ``fwd`` (image → Q-Former features,
  no grad) and ``qformer-fwd+bwd`` (the Q-Former's forward + backward on fixed image features).
* ``llava-ov``: LLaVA-OneVision's vision tower + pooling (``get_video_features``: SigLIP so400m —
  27 layers, hidden 1152, 16 heads of 72, 729 tokens — in bfloat16, the projector, then bilinear
  27×27 → 14×14), 16 frames.  Mode ``fwd``.

Run (a GPU; prints a table, writes JSON with device, versions, commit and date)::

    python examples/blip2_e2e.py --json e2e.json
    python examples/blip2_e2e.py --tiny            # shrunk configs, seconds on a CPU (smoke test)

On a CPU without ``TRITON_INTERPRET=1`` the patched model's mmkernels ops fall back to their
``sdpa`` / ``reference`` backends (the output says which backends ran): the CPU numbers are a
smoke test, not a benchmark.  Timing and the environment record come from ``mmkernels.bench``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from collections import Counter

import torch

import mmkernels as mk
from mmkernels import dispatch
from mmkernels.bench import env
from mmkernels.bench.timing import sync, time_fn

VARIANTS = ("patched", "eager", "sdpa")
MODELS = ("blip2", "llava-ov")

# real sizes (Salesforce/blip2-opt-2.7b; llava-hf/llava-onevision-qwen2-0.5b-ov) and --tiny ones
BLIP2 = dict(
    vision=dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
                image_size=224, patch_size=14),
    qformer=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 encoder_hidden_size=1408),
    num_query_tokens=32, batch=32)
BLIP2_TINY = dict(
    vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                image_size=56, patch_size=14),
    qformer=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 encoder_hidden_size=64, cross_attention_frequency=1),
    num_query_tokens=8, batch=2)
ONEVISION = dict(
    vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                image_size=384, patch_size=14),
    text_hidden=896, frames=16)
ONEVISION_TINY = dict(
    vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                image_size=84, patch_size=14),
    text_hidden=64, frames=2)
TINY_LM = dict(num_hidden_layers=1, num_attention_heads=4, vocab_size=128, max_position_embeddings=64)


@contextlib.contextmanager
def backends_used():
    """Count (op, backend) of every mmkernels dispatch decision inside the block."""
    seen: Counter = Counter()
    with dispatch.record() as calls:
        yield seen
    seen.update(f"{op}:{name}" for op, name in calls)


def set_variant(model, variant: str) -> None:
    """HF ``eager`` / ``sdpa``, or sdpa + ``mk.patch`` (idempotent: unpatches first)."""
    mk.unpatch(model)
    model.set_attn_implementation("eager" if variant == "eager" else "sdpa")
    if variant == "patched":
        mk.patch(model)


def build_blip2(tiny: bool, device):
    import transformers

    s = BLIP2_TINY if tiny else BLIP2
    text = dict(TINY_LM, model_type="opt", hidden_size=64, ffn_dim=128, word_embed_proj_dim=64)
    cfg = transformers.Blip2Config(vision_config=s["vision"], qformer_config=s["qformer"], text_config=text,
                                   num_query_tokens=s["num_query_tokens"])
    with torch.device(device):
        model = transformers.Blip2Model(cfg)
    model.vision_model.to(torch.bfloat16)  # HF: vision in the checkpoint's dtype, Q-Former kept fp32
    model.language_model.to(torch.bfloat16)
    model.eval()
    v = s["vision"]
    pixels = torch.randn(s["batch"], 3, v["image_size"], v["image_size"], device=device, dtype=torch.bfloat16)
    tokens = (v["image_size"] // v["patch_size"]) ** 2 + 1
    shape = (f"B={s['batch']}, vision {v['num_hidden_layers']}x{v['hidden_size']} "
             f"({v['num_attention_heads']} heads of {v['hidden_size'] // v['num_attention_heads']}, {tokens} tokens, "
             f"bf16), Q-Former {s['qformer']['num_hidden_layers']}x{s['qformer']['hidden_size']} "
             f"({s['qformer']['num_attention_heads']} heads, {s['num_query_tokens']} queries, fp32)")

    def fwd():
        with torch.no_grad():
            return model.get_qformer_features(pixel_values=pixels)

    with torch.no_grad():
        image_embeds = model.vision_model(pixel_values=pixels).last_hidden_state  # fixed input for the bwd mode
    qparams = [p for p in model.qformer.parameters()] + [model.query_tokens]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in qparams:
        p.requires_grad_(True)
    ones = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=device)
    grad_out = torch.randn(s["batch"], s["num_query_tokens"], s["qformer"]["hidden_size"], device=device)

    def qformer_fwd_bwd():
        q = model.query_tokens.expand(image_embeds.shape[0], -1, -1)
        out = model.qformer(query_embeds=q, encoder_hidden_states=image_embeds, encoder_attention_mask=ones,
                            return_dict=True).last_hidden_state
        out.backward(grad_out)

    return model, shape, {"fwd": (fwd, ()), "qformer-fwd+bwd": (qformer_fwd_bwd, qparams)}


def build_onevision(tiny: bool, device):
    import transformers

    s = ONEVISION_TINY if tiny else ONEVISION
    text = dict(TINY_LM, model_type="qwen2", hidden_size=s["text_hidden"], intermediate_size=2 * s["text_hidden"],
                num_key_value_heads=2)
    vision = dict(s["vision"], model_type="siglip_vision_model", vision_use_head=False)  # as the checkpoint
    cfg = transformers.LlavaOnevisionConfig(vision_config=vision, text_config=text, vision_feature_layer=-1,
                                            vision_feature_select_strategy="full")
    with torch.device(device):
        model = transformers.LlavaOnevisionModel(cfg)
    model.to(torch.bfloat16).eval()
    v = s["vision"]
    side = v["image_size"] // v["patch_size"]
    videos = torch.randn(1, s["frames"], 3, v["image_size"], v["image_size"], device=device, dtype=torch.bfloat16)
    shape = (f"{s['frames']} frames, SigLIP {v['num_hidden_layers']}x{v['hidden_size']} ({v['num_attention_heads']} "
             f"heads of {v['hidden_size'] // v['num_attention_heads']}, {side * side} tokens, bf16), projector, "
             f"bilinear {side}x{side} -> {math.ceil(side / 2)}x{math.ceil(side / 2)}")

    def fwd():
        with torch.no_grad():
            return model.get_video_features(pixel_values_videos=videos).pooler_output

    return model, shape, {"fwd": (fwd, ())}


BUILDERS = {"blip2": build_blip2, "llava-ov": build_onevision}


def run_model(name: str, args, device) -> dict:
    model, shape, cases = BUILDERS[name](args.tiny, device)
    print(f"\n== {name}: {shape}")
    result = {"shape": shape, "modes": {}}
    outputs = {}
    for mode, (fn, grads) in cases.items():
        row = {}
        for variant in args.variants:
            set_variant(model, variant)
            with backends_used() as seen:
                out = fn()  # also the first warm-up call
                sync(device)
            if mode == "fwd":
                outputs[variant] = out.float()
            t = time_fn(fn, device, grads=grads, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms, min_reps=3)
            row[variant] = dict(t.asdict(), mmkernels_backends=dict(seen) if variant == "patched" else None)
        mk.unpatch(model)
        for variant in row:
            for base in ("eager", "sdpa"):
                if base in row and variant != base:
                    row[variant][f"speedup_vs_{base}"] = row[base]["ms_p50"] / row[variant]["ms_p50"]
        result["modes"][mode] = row
        print(f"  {mode}:")
        for variant, r in row.items():
            sp = "  ".join(f"{r[k]:.2f}x vs {k[11:]}" for k in ("speedup_vs_eager", "speedup_vs_sdpa") if k in r)
            print(f"    {variant:8s} {r['ms_p50']:10.3f} ms  (p20 {r['ms_p20']:.3f}, p80 {r['ms_p80']:.3f}, "
                  f"{r['reps']} reps)  {sp}")
            if r.get("mmkernels_backends") is not None:
                print(f"             mmkernels ops ran on: {r['mmkernels_backends'] or 'none'}")
    if "eager" in outputs:  # the variants compute the same thing (bf16 vision: loose)
        ref = outputs["eager"]
        result["max_abs_diff_vs_eager"] = {v: float((o - ref).abs().max()) for v, o in outputs.items() if v != "eager"}
        print(f"  max |out - eager| (fwd): {result['max_abs_diff_vs_eager']}")
    del model
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", "--quick", action="store_true", help="shrunk configs: seconds on a CPU (smoke test)")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--warmup-ms", type=float, default=None)
    ap.add_argument("--rep-ms", type=float, default=None)
    args = ap.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.variants = [v for v in args.variants.split(",") if v]
    for m in args.models:
        if m not in MODELS:
            ap.error(f"--models: unknown {m!r}")
    for v in args.variants:
        if v not in VARIANTS:
            ap.error(f"--variants: unknown {v!r}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.warmup_ms is None:
        args.warmup_ms = 5.0 if args.tiny else 100.0
    if args.rep_ms is None:
        args.rep_ms = 20.0 if args.tiny else 500.0

    import transformers

    torch.manual_seed(0)
    record = env.describe(device)
    commit, dirty = env.git_commit()
    record.update(date=env.now_iso(), commit=commit, dirty=dirty, tiny=args.tiny,
                  transformers=transformers.__version__, variants=args.variants, models={})
    interp = os.environ.get("TRITON_INTERPRET", "") == "1"
    if device.type == "cpu":
        note = ("CPU" + (" with TRITON_INTERPRET=1: mmkernels' Triton kernels run in the interpreter (slow)" if interp
                         else " without the Triton interpreter: the patched model's mmkernels ops fall back to their "
                         "sdpa / reference backends") + " -- these numbers are a smoke test, not a benchmark")
    else:
        note = f"{env.device_name(device)}: mmkernels ops on their GPU backends (triton / cuda)"
    record["note"] = note
    print(f"mmkernels end-to-end: {env.device_name(device)}, torch {torch.__version__}, transformers "
          f"{transformers.__version__}, mmkernels {mk.__version__}, commit {commit[:12]}"
          f"{' (dirty)' if dirty else ''}\n{note}")
    for name in args.models:
        record["models"][name] = run_model(name, args, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

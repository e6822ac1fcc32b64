"""GPU code generation checked on a CPU machine (``mmkernels inspect`` / ``compile_report``).

The interpreter never lowers to PTX, so a kernel that only runs interpreted would pass every
other test here and still fail (or crawl) on a GPU.  Triton compiles for a CUDA target without
one; ``compile_report`` compiles each launch the launchers make, bound by the JIT's own binder
(the specialisation of a real launch), and reads registers, spills, shared memory, async copies
and load widths from the result.  These tests hold what a GPU needs:

* sm_90: every attention-family main loop (attention fwd / dK-dV / dQ, Q-Former) at head dims
  64/72/80/88/128, bf16, default configuration: pipelined (16-byte ``cp.async`` or TMA), no
  scalar 2-byte loads, no spills, shared memory <= 227 KB, the attention kernels' products all
  on wgmma (no mma.sync) — also with a padding mask and dropout; the same for the packed
  (varlen) kernels at the Qwen2-VL packing (d=80, RoPE by a pre-pass: the plain loops), and d=72
  with dropout, d=88 causal;
* sm_90: the TMA forward candidates (``USE_TMA``) at d=64 and d=88 copy K/V with
  ``cp.async.bulk.tensor``, feed ``wgmma``, and do not spill;
* sm_80: ``cp.async`` present;
* every kernel (token pooling too, fp32 too) compiles.

One child process (no TRITON_INTERPRET) compiles the default configuration of each launch (and
the TMA candidates of the forward at two head dims); the full candidate sweep is ``mmkernels
inspect``.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import triton_has_cuda_backend

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not triton_has_cuda_backend(), reason="triton has no NVIDIA backend on this platform"),
]

ROOT = Path(__file__).resolve().parents[1]
HEAD_DIMS = (64, 72, 80, 88, 128)
MAIN_LOOPS = ("attention.fwd", "attention.dkdv", "attention.dq", "qformer_cross_attention.fwd")
VARLEN = ["attention_varlen.fwd", "attention_varlen.dkdv", "attention_varlen.dq"]

# (arch, dtype, compile_report keyword arguments): ~64 compiles, ~2.5 min on one core
DENSE = ["attention.fwd", "attention.dkdv", "attention.dq"]
RUNS = [
    (90, "bf16", dict(presets=["clip-l336", "siglip-so400m", "qwen2-vl", "eva-vit-g",
                                                          "d128-16k", "blip2", "gemma3", "llava-ov", "internvl",
                                                          "llava-video"])),
    (90, "bf16", dict(presets=["siglip-so400m", "eva-vit-g", "blip2"], variants=["mask+dropout"],
                      kernels=list(MAIN_LOOPS))),
    (90, "fp16", dict(presets=["eva-vit-g"], variants=["causal"], kernels=["attention"])),
    # packed attention: the Qwen2-VL vision packing (d=80, RoPE pre-pass), d=72 + dropout, d=88 causal
    (90, "bf16", dict(presets=["qwen2-vl-packed"], kernels=VARLEN)),
    (90, "bf16", dict(presets=["varlen-d72"], variants=["dropout"], kernels=VARLEN)),
    (90, "bf16", dict(presets=["varlen-d88"], variants=["causal"], kernels=VARLEN)),
    (90, "fp32", dict(presets=["eva-vit-g", "blip2", "gemma3"])),
    (80, "bf16", dict(presets=["siglip-so400m", "blip2"], kernels=list(MAIN_LOOPS))),
    (80, "fp32", dict(presets=["internvl"])),
    # a bool padding mask alone (now read per key: key spans, the unmasked 128x128 default; as a
    # per-score mask tile it spilled 1.9 KB there) and RoPE (now a pre-pass + the plain loops; in
    # the loops its fp32 cos/sin stages took the 128x128 forward to 340 KB): 15 compiles
    (90, "bf16", dict(presets=["siglip-so400m", "eva-vit-g"], variants=["mask"], kernels=DENSE)),
    # every candidate the autotuner tries: with dropout at d=72 (one Philox call per 4 keys let the
    # pruning rule keep 128x64 / 32x128 tiles) and the Q-Former backward's 32-query shapes
    (90, "bf16", dict(presets=["siglip-so400m"], variants=["dropout"], kernels=DENSE, configs="all")),
    (90, "bf16", dict(presets=["blip2-qformer-cross"], kernels=DENSE, configs="all")),
    (90, "bf16", dict(presets=["clip-l336", "qwen2-vl", "d128-16k"], variants=["rotary"], kernels=DENSE)),
    # the tensor-descriptor (TMA) forward candidates at d=64 and d=88: 4 compiles
    (90, "bf16", dict(presets=["clip-l336", "eva-vit-g"], kernels=["attention.fwd"], configs="tma")),
]

_CHILD = """
import json, sys
from mmkernels.tools.compile_report import compile_report
rows = []
for arch, dtype, kw in json.loads(sys.argv[1]):
    kw.setdefault("configs", "default")
    for r in compile_report(arch, dtype=dtype, **kw):
        r.pop("compiled")
        rows.append(r)
json.dump(rows, open(sys.argv[2], "w"))
"""


def _child_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("inspect") / "rows.json"
    res = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(RUNS), str(out)], capture_output=True, text=True,
                         env=_child_env(), timeout=900, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr[-5000:]
    return json.loads(out.read_text())


def _name(r) -> str:
    return f"sm_{r['arch']} {r['dtype']} {r['kernel']} {r['preset']} {r['variant']} d={r['head_dim']}"


def test_every_kernel_compiles(rows):
    failed = [f"{_name(r)}: {r['error'][-1500:]}" for r in rows if r["error"]]
    assert not failed, "\n".join(failed)
    kernels = {r["kernel"] for r in rows}
    assert kernels == {"attention.fwd", "attention.dkdv", "attention.dq", "attention.preprocess",
                       "qformer_cross_attention.fwd", "token_pool.fwd", "token_pool.norm_bwd", "token_pool.bwd",
                       "attention_scores.stats", "attention_scores.colsum", *VARLEN}
    assert {r["dtype"] for r in rows} == {"bf16", "fp16", "fp32"}
    assert {r["head_dim"] for r in rows if r["family"] == "attention" and r["arch"] == 90} == set(HEAD_DIMS)


def test_launch_specialisation_is_the_jits(rows):
    """The binder made the unit strides constants and marked the 16-divisible ones (d=64 rows)
    but not d=72's row stride: what a real launch compiles, which an ASTSource without attrs
    does not."""
    r = next(r for r in rows if r["kernel"] == "attention.fwd" and r["head_dim"] == 64 and r["arch"] == 90)
    assert {"sqd", "skd", "svd", "sod"} <= set(r["specialization"]["constant"])
    assert {"Q", "K", "V", "O", "sqm", "skn", "svn"} <= set(r["specialization"]["divisible_by_16"])
    r = next(r for r in rows if r["kernel"] == "attention.fwd" and r["head_dim"] == 72 and r["arch"] == 90)
    assert "sqm" not in r["specialization"]["divisible_by_16"]  # 72 elements: not a multiple of 16


def test_sm90_fp32_highest_precision_no_spills(rows):
    """fp32 under torch's default "highest" matmul precision (how HF runs BLIP-2's Q-Former)
    compiles ``tl.dot`` to FMA loops with operands in registers; its own candidate lists keep
    it spill-free (the TF32 tiles spilled 0.2-9.6 KB there)."""
    seen = [r for r in rows if r["arch"] == 90 and r["dtype"] == "fp32" and not r["error"]
            and r["kernel"] in MAIN_LOOPS]
    assert len(seen) >= 4
    bad = [f"{_name(r)} {r['config']}: {r['spill_bytes']} bytes of spills" for r in seen if r["spill_bytes"]]
    assert not bad, "\n".join(bad)


def test_sm90_interior_key_tiles_have_no_mask_work(rows):
    """The forward and dQ kernels run their key loop in two phases; the first (interior tiles:
    in range, left of the causal diagonal) must carry no bounds/causal selects — measured on
    sm_90 bf16 d=64: 130 FSEL per iteration before the split, 2 after (packed kernels: 66 -> 2;
    dropout selects too, so those rows are not held to it; RoPE is a pre-pass: its rows are the
    plain loops and are held to it; so is a (B, 1, 1, Lk) padding mask: read per key on the edge
    tiles only, key spans)."""
    bad, seen = [], 0
    for r in rows:
        if (r["arch"] != 90 or r["dtype"] == "fp32" or r["error"]
                or r["kernel"] not in ("attention.fwd", "attention.dq", "attention_varlen.fwd", "attention_varlen.dq")
                or "dropout" in r["variant"]):
            continue
        seen += 1
        # the key loops: those with tensor-core ops (the packed kernels' sequence lookup is a loop too)
        loops = [lp for lp in r["loops"] if lp["hgmma"] or lp["hmma"]]
        # the TMA forward's SASS has 6 such loops (d=64/88, triton 3.9; not analysed yet): the
        # first is still the interior one (463 instructions, 2 FSEL at d=64), held to the bound
        if r["config"].get("USE_TMA") and loops:
            loops = loops[:2]
        if len(loops) != 2:
            bad.append(f"{_name(r)}: expected an interior and an edge key loop, SASS has {len(loops)} loops")
        elif loops[0]["fsel"] > 4:
            bad.append(f"{_name(r)}: {loops[0]['fsel']} FSEL per interior iteration ({loops})")
    assert seen >= 10 and not bad, "\n".join(bad)


def test_sm90_main_loops_pipelined_vector_loads_no_spills(rows):
    bad = []
    for r in rows:
        if r["arch"] != 90 or r["dtype"] == "fp32" or r["error"]:
            continue
        if r["spill_bytes"]:
            bad.append(f"{_name(r)}: {r['spill_bytes']} bytes of spills")
        if r["shared_bytes"] > 227 * 1024:
            bad.append(f"{_name(r)}: {r['shared_bytes']} bytes of shared memory")
        if r["kernel"] in MAIN_LOOPS or r["kernel"] in VARLEN:
            if not (r["cp_async_16"] or r["tma"]):
                bad.append(f"{_name(r)}: main loop not pipelined (cp.async {r['cp_async_sizes']}, tma {r['tma']})")
            # the bool mask is read a byte per score: only Q/K/V/dO must be vector loads
            if r["ld_scalar_narrow"] and "mask" not in r["variant"]:
                bad.append(f"{_name(r)}: {r['ld_scalar_narrow']} scalar 2-byte loads")
            # 32-row tiles for 32 queries (the Q-Former backward: ``_CANDIDATES_SHORT_Q``) are
            # mma.sync by design, as the Q-Former forward: wgmma needs 64 rows per warpgroup
            short = (r["config"] or {}).get("BLOCK_M") == 32 and r["kernel"] != "attention.dkdv"
            if not r["wgmma"] and not short:
                bad.append(f"{_name(r)}: no wgmma")
            # every product of the attention kernels on 64-row wgmma tiles (dK/dV computes on
            # transposed tiles for this): an mma.sync means a product fell back to 16-row MMAs
            if r["kernel"].startswith(("attention.", "attention_varlen.")) and r["mma_sync"] and not short:
                bad.append(f"{_name(r)}: {r['mma_sync']} mma.sync")
    assert not bad, "\n".join(bad)


def test_sm90_tma_forward_candidates(rows):
    """The USE_TMA forward loop compiles to TMA copies (no per-thread cp.async left in it) feeding
    wgmma, without spills, where the pointer loop's default uses cp.async."""
    tma = [r for r in rows if r["config"].get("USE_TMA") and r["kernel"] == "attention.fwd"
           and r["variant"] == "plain" and r["preset"] in ("clip-l336", "eva-vit-g")]
    assert {r["head_dim"] for r in tma} == {64, 88}
    bad = [f"{_name(r)} {r['config']}: tma {r['tma']}, cp.async {r['cp_async_sizes']}, wgmma {r['wgmma']}, "
           f"spills {r['spill_bytes']}, smem {r['shared_bytes']}" for r in tma
           if r["error"] or not r["tma"] or r["cp_async"] or not r["wgmma"] or r["spill_bytes"]
           or r["shared_bytes"] > 227 * 1024 or r["default"]]
    assert not bad, "\n".join(bad)
    assert not any(r["tma"] for r in rows if not r["config"].get("USE_TMA"))


def test_sm80_main_loops_use_cp_async(rows):
    sm80 = [r for r in rows if r["arch"] == 80 and r["kernel"] in MAIN_LOOPS]
    assert sm80
    bad = [f"{_name(r)}: cp.async {r['cp_async_sizes']}" for r in sm80 if not r["cp_async_16"]]
    assert not bad, "\n".join(bad)
    assert all(r["mma_sync"] and not r["wgmma"] for r in sm80 if r["dtype"] == "bf16")


def test_flops_and_bytes_model(rows):
    r = next(r for r in rows if r["kernel"] == "attention.fwd" and r["preset"] == "eva-vit-g" and r["arch"] == 90
             and r["dtype"] == "bf16" and r["variant"] == "plain")
    assert r["flops"] == 4 * 32 * 16 * 257 * 257 * 88
    assert r["bytes"] == 4 * 32 * 16 * 257 * 88 * 2 + 8 * 32 * 16 * 257


def test_cli_json():
    """``mmkernels inspect`` end to end (one small kernel; the fixture's compile is cached)."""
    res = subprocess.run([sys.executable, "-m", "mmkernels", "inspect", "--kernel", "attention.preprocess",
                          "--preset", "eva-vit-g", "--json"], capture_output=True, text=True, env=_child_env(),
                         timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads(res.stdout)
    assert [r["kernel"] for r in doc["rows"]] == ["attention.preprocess"]
    assert doc["rows"][0]["registers"] > 0 and doc["rows"][0]["error"] is None


def _inspect(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmkernels", "inspect", *args], capture_output=True, text=True,
                          env=_child_env(), timeout=600, cwd=ROOT)


def test_cli_text_streams_rows_after_the_plan():
    """The count of compiles and a time estimate come first, each row as its compile finishes, and
    the dtype may be spelled as torch spells it."""
    res = _inspect("--kernel", "attention.preprocess", "--preset", "eva-vit-g", "--dtype", "bfloat16", "--quick")
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.splitlines()
    assert lines[0].startswith("sm_90, bf16, triton ") and ": 1 compiles (" in lines[0] and "about " in lines[0]
    assert lines[1].split()[:3] == ["kernel", "preset", "variant"]
    assert lines[2].split()[:4] == ["attention.preprocess", "eva-vit-g", "plain", "88"]
    assert lines[-1].startswith("1 compiles in ") and lines[-1].endswith("0 problem(s)")


def test_cli_unknown_names_are_errors():
    """A typo (or a selection that matches no launch) exits 2 naming the valid values; it used to
    exit 0 with "0 problem(s)", so ``--check`` passed."""
    for args, expected in ((["--kernel", "atention"], "attention.fwd"), (["--preset", "clip-l33"], "clip-l336"),
                           (["--head-dim", "96"], "64, 72, 80, 88, 128"), (["--variant", "masked"], "mask+dropout"),
                           (["--dtype", "int8"], "bf16/bfloat16"),
                           (["--kernel", "token_pool", "--preset", "clip-l336"], "nothing to compile")):
        res = _inspect(*args, "--check")
        assert res.returncode == 2 and expected in res.stderr, (args, res.stdout, res.stderr[-2000:])


def test_kernel_aliases():
    """``--kernel qformer`` / ``qformer.fwd``, the Q-Former cross-attention family's earlier name, still
    select its kernel; a misspelt name under the alias is still an error naming the kernels."""
    from mmkernels.tools.compile_report import _canonical, selection_errors

    assert _canonical(["qformer", "qformer.fwd", "attention"]) == [
        "qformer_cross_attention", "qformer_cross_attention.fwd", "attention"]
    assert selection_errors(kernels=["qformer", "qformer.fwd"]) == []
    (err,) = selection_errors(kernels=["qformer.bwd"])
    assert "'qformer.bwd'" in err and "qformer_cross_attention.fwd" in err


def test_quick_plan():
    """``--quick``: the default configuration of every kernel at one preset per head dim; the plan
    (what is counted and estimated up front) is the compile list without compiling."""
    code = ("import json\nfrom mmkernels.tools.compile_report import plan, estimate_s, QUICK_PRESETS\n"
            "q = plan(90, presets=list(QUICK_PRESETS), configs='default')\nfull = plan(90)\n"
            "print(json.dumps([len(q), len(full), estimate_s(q), estimate_s(full), sorted({r['kernel'] for r in q}),"
            " sorted({r['kernel'] for r in full}), sorted({r['head_dim'] for r in q if r['family'] == 'attention'}),"
            " all(r['default'] for r in q)]))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_child_env(), timeout=300,
                         cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    n_quick, n_full, s_quick, s_full, k_quick, k_full, dims, defaults = json.loads(res.stdout.splitlines()[-1])
    assert 0 < n_quick < n_full / 3 and k_quick == k_full and dims == list(HEAD_DIMS) and defaults
    assert s_quick < 180 and s_full > 4 * s_quick


def test_refuses_interpreted_kernels():
    """In this process the kernels are interpreted (conftest sets TRITON_INTERPRET): nothing to compile."""
    import mmkernels.tools

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("kernels are compiled in this process")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        mmkernels.tools.compile_report(90)  # the public spelling: the package attribute is callable


def test_ptx_counting():
    from mmkernels.tools.compile_report import _ptx_stats

    ptx = """
	@%p1 ld.global.b16 { %rs1 }, [ %rd1 + 0 ];
	ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd2 + 0 ];
	ld.global.L1::evict_last.b32 { %r5 }, [ %rd3 + 0 ];
	cp.async.cg.shared.global [ %r6 + 0 ], [ %rd4 + 0 ], 0x10, %r7;
	cp.async.ca.shared.global [ %r8 + 0 ], [ %rd5 + 0 ], 4, %r9;
	cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%r1], [%rd6, {%r2, %r3}], [%r4];
	wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {...};
	mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {...};
"""
    s = _ptx_stats(ptx)
    assert (s["ld_vector"], s["ld_scalar"], s["ld_scalar_narrow"]) == (1, 2, 1)
    assert (s["cp_async"], s["cp_async_16"], s["cp_async_sizes"]) == (2, 1, {4: 1, 16: 1})
    assert (s["tma"], s["wgmma"], s["mma_sync"]) == (1, 1, 1)


_FP8_CHILD = r"""
import json, re, sys
from mmkernels.tools.compile_report import compile_report
rows = []
for kw in (dict(presets=["qwen2-vl"], variants=["causal"], kernels=["attention.fwd"]),
           dict(presets=["qwen2-vl-packed"], kernels=["attention_varlen.fwd"])):
    for r in compile_report(90, dtype="fp8", configs="default", **kw):
        c = r.pop("compiled", None)
        ptx = c.asm["ptx"] if c is not None else ""
        r["wgmma_kinds"] = sorted(set(re.findall(r"wgmma\.mma_async\S*", ptx)))
        rows.append(r)
json.dump(rows, open(sys.argv[1], "w"))
"""


def test_sm90_fp8_forward(tmp_path):
    """The fp8 (e4m3) forward's defaults, dense (d=80 causal) and packed (Qwen2-VL packing, RoPE in
    the quantising pre-pass): both products on wgmma with e4m3 operands, 16-byte cp.async, no
    spills (2 compiles, ~15 s; the full sweep: docs/inspect/fp8_sm90.md)."""
    out = tmp_path / "fp8.json"
    res = subprocess.run([sys.executable, "-c", _FP8_CHILD, str(out)], capture_output=True, text=True,
                         env=_child_env(), timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr[-5000:]
    rows = json.loads(out.read_text())
    assert {r["kernel"] for r in rows} == {"attention.fwd", "attention_varlen.fwd"}
    bad = [f"{_name(r)} {r['config']}: error {bool(r['error'])}, spills {r['spill_bytes']}, wgmma "
           f"{r['wgmma_kinds']}, mma.sync {r['mma_sync']}, cp.async {r['cp_async_sizes']}" for r in rows
           if r["error"] or r["spill_bytes"] or r["mma_sync"] or not r["cp_async_16"] or not r["wgmma_kinds"]
           or not all(k.endswith(".f32.e4m3.e4m3") for k in r["wgmma_kinds"])]
    assert not bad, "\n".join(bad)

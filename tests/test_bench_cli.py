"""The ``mmkernels bench`` command, its machinery (mmkernels/bench/) and ``mmkernels info``'s ceilings.

Commands run in a subprocess with no GPU visible, no Triton interpreter and a private cache
directory (the ceilings are cached per user), as a user on a CPU machine would run them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mmkernels.bench import compare, flops, registry, report, runner, suite, timing
from mmkernels.bench.cases_attention import AttnShape

ROOT = Path(__file__).resolve().parents[1]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "MMKERNELS_BACKEND", "MMKERNELS_JIT_BUILD")}
    env.update(CUDA_VISIBLE_DEVICES="", MMKERNELS_CACHE_DIR=str(tmp_path / "cache"),
               PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    env.update(extra)
    return env


def _run(args: list[str], tmp_path: Path, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT,
                          env=_env(tmp_path, **env), timeout=timeout)


# --------------------------------------------------------------------------------------
# the command on a CPU machine
# --------------------------------------------------------------------------------------
def test_bench_attention_quick_json_on_cpu(tmp_path):
    out = tmp_path / "attn.json"
    t0 = time.perf_counter()
    res = _run(["-m", "mmkernels", "bench", "attention", "--quick", "--json", str(out), "--plain"], tmp_path)
    elapsed = time.perf_counter() - t0
    assert res.returncode == 0, res.stdout + res.stderr
    # seconds on an idle 2-core machine (~5 s, torch import included); generous for a loaded CI box
    assert elapsed < 60, f"took {elapsed:.1f} s"
    doc = json.loads(out.read_text())
    assert doc["schema"] == "mmkernels.bench/1" and doc["op"] == "attention"
    for field in ("date", "commit", "device", "versions", "ceilings", "config", "flop_convention", "cases"):
        assert field in doc, field
    assert doc["device"]["type"] == "cpu" and doc["versions"]["torch"] == torch.__version__
    assert doc["ceilings"]["matmul_tflops"] > 0 and doc["ceilings"]["copy_gbps"] > 0
    cases = doc["cases"]
    presets = {c["preset"] for c in cases}
    assert presets == set(registry.MODEL_PRESETS)  # every model preset has attention shapes
    timed = {c["backend"] for c in cases if c["status"] == "ok"}
    assert {"eager", "sdpa-flash", "sdpa-math"} <= timed
    assert all(c["status"] == "ok" for c in cases), [c["reason"] for c in cases if c["status"] != "ok"]
    for c in cases:
        assert c["ms_p50"] > 0 and c["ms_p20"] <= c["ms_p50"] <= c["ms_p80"]
        assert c["check"]["ok"], c
        assert c["scaled_from"]  # CPU: the real shapes are shrunk, and the file says from what
        assert c["key"] == f"attention/{c['preset']}/{c['case']}/{c['dtype']}/{c['mode']}/{c['backend']}"
    eager = [c for c in cases if c["backend"] == "eager"]
    assert all(c["speedup_vs_eager"] == pytest.approx(1.0) for c in eager)
    # GPU kernels are named as not timed, with the reason
    assert "triton" in doc["not_timed"] and "TRITON_INTERPRET" in doc["not_timed"]["triton"]
    assert "were not timed" in res.stdout and "not performance results" in res.stdout
    assert "wrote" in res.stdout


def _main(argv: list[str]) -> int:
    from mmkernels.__main__ import main

    return main(argv)


def test_bench_help_lists_ops_and_compare(capsys):
    with pytest.raises(SystemExit) as ex:
        _main(["bench", "--help"])
    assert ex.value.code == 0
    out = capsys.readouterr().out
    for word in ("attention", "qformer", "token_pool", "compare"):
        assert word in out
    assert "\n    model" not in out  # `bench model` arrives with issue 5


def test_bench_missing_op_is_skipped_not_a_crash(tmp_path, capsys, monkeypatch):
    """An op whose public function is not in the build: skipped with the reason, exit 0, JSON says so."""
    import mmkernels

    monkeypatch.delattr(mmkernels, "token_pool", raising=False)
    out = tmp_path / "tp.json"
    assert _main(["bench", "token_pool", "--quick", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "skipped" in text and "mmkernels.token_pool does not exist" in text
    doc = json.loads(out.read_text())
    assert doc["skipped"] and doc["cases"] == [] and doc["device"]["name"]


def test_bench_bad_arguments_exit_2(capsys):
    assert _main(["bench", "attention", "--preset", "nosuchmodel", "--quick"]) == 2
    assert "unknown preset" in capsys.readouterr().err
    assert _main(["bench", "attention", "--backends", "nosuch", "--quick"]) == 2
    assert "unknown backend" in capsys.readouterr().err
    assert _main(["bench", "attention", "--shape", "B=1,H=2", "--quick"]) == 2
    assert "missing Lq, Lk, d" in capsys.readouterr().err
    assert _main(["bench", "attention", "--mode", "backward", "--quick"]) == 2
    assert "--mode" in capsys.readouterr().err


def test_bench_list_shows_presets_and_backends(capsys):
    assert _main(["bench", "attention", "--list", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "gemma3" in out and "B=4 H=16 L=4096 d=72" in out and "sdpa-cudnn" in out


def test_info_json_has_ceilings_cached_per_device(tmp_path, capsys, monkeypatch):
    from mmkernels.bench import info

    monkeypatch.setenv("MMKERNELS_CACHE_DIR", str(tmp_path / "cache"))
    assert _main(["info", "--json"]) == 0
    c = json.loads(capsys.readouterr().out)["ceilings"]
    for field in ("copy_gbps", "matmul_tflops", "matmul_dtype", "measured", "key", "cached", "cache_file"):
        assert field in c, field
    want = "bfloat16" if torch.cuda.is_available() else "float32"
    assert c["copy_gbps"] > 0 and c["matmul_tflops"] > 0 and c["matmul_dtype"] == want
    assert c["cached"] is False
    cache = tmp_path / "cache" / "ceilings.json"
    assert json.loads(cache.read_text())[c["key"]]["copy_gbps"] == c["copy_gbps"]
    assert _main(["info"]) == 0
    assert "(cached in" in capsys.readouterr().out
    assert "ceilings" not in info.collect()  # only on request: the probe stays cheap


# --------------------------------------------------------------------------------------
# compare: the performance gate
# --------------------------------------------------------------------------------------
def _doc(ms: dict[str, float], device="NVIDIA H100 80GB HBM3") -> dict:
    return {"schema": "mmkernels.bench/1", "device": {"name": device}, "commit": "abc", "date": "2026-01-01",
            "cases": [{"key": k, "status": "ok", "ms_p50": v} for k, v in ms.items()]}


def _write(path: Path, doc) -> str:
    path.write_text(json.dumps(doc))
    return str(path)


def test_compare_fails_on_a_20_percent_regression_and_passes_5(tmp_path, capsys):
    keys = {"attention/llava15/clip-vitl336/bfloat16/fwd/triton": 1.0,
            "attention/gemma3/siglip-896/bfloat16/fwd/triton": 4.0}
    base = _write(tmp_path / "base.json", _doc(keys))
    slow = _write(tmp_path / "slow.json", _doc({k: v * (1.20 if "llava15" in k else 1.0) for k, v in keys.items()}))
    ok = _write(tmp_path / "ok.json", _doc({k: v * 1.05 for k, v in keys.items()}))

    assert compare.main(base, slow, threshold=0.10, plain=True) == 1
    out = capsys.readouterr().out
    assert "+20.0%" in out and "regressed" in out and "FAIL" in out
    assert "siglip-896" in out  # every case is printed, not only the regression

    assert compare.main(base, ok, threshold=0.10, plain=True) == 0
    out = capsys.readouterr().out
    assert "+5.0%" in out and "PASS" in out and "regressed" not in out.split("case(s):")[0]

    assert compare.main(base, slow, threshold=0.25, plain=True) == 0  # the threshold is honoured


def test_compare_cli_exit_codes_and_missing_cases(tmp_path, capsys):
    base = _write(tmp_path / "base.json", _doc({"a": 1.0, "b": 1.0}))
    new = _write(tmp_path / "new.json", _doc({"a": 1.2, "c": 1.0}))
    assert _main(["bench", "compare", base, new, "--plain"]) == 1
    out = capsys.readouterr().out
    for word in ("regressed", "missing", "new", "+20.0%"):
        assert word in out
    assert _main(["bench", "compare", base, new, "--threshold", "0.25"]) == 0
    new2 = _write(tmp_path / "new2.json", _doc({"a": 1.0}))
    assert compare.main(base, new2, plain=True) == 0
    assert compare.main(base, new2, plain=True, fail_on_missing=True) == 1


def test_compare_reads_pytest_benchmark_json(tmp_path):
    def pb(median_s, ms_cuda=None):
        extra = {"key": "attention/llava15/clip-vitl336/bfloat16/fwd/triton"}
        if ms_cuda is not None:
            extra["ms_p50"] = ms_cuda
        return {"machine_info": {"mmkernels_device": "NVIDIA H100 80GB HBM3"}, "commit_info": {"id": "abc"},
                "datetime": "2026-01-01", "benchmarks": [{"name": "t", "fullname": "f::t", "extra_info": extra,
                                                         "stats": {"median": median_s}}]}

    base = _write(tmp_path / "b.json", pb(1e-3, ms_cuda=1.0))
    # wall-clock median unchanged, the CUDA-event median 30 % slower: the CUDA one is gated on
    new = _write(tmp_path / "n.json", pb(1e-3, ms_cuda=1.3))
    assert compare.main(base, new, plain=True) == 1
    # without extra_info.ms_p50 on both sides, pytest-benchmark's own median is used
    assert compare.main(_write(tmp_path / "b2.json", pb(1e-3)), _write(tmp_path / "n2.json", pb(1.04e-3)),
                        plain=True) == 0


def test_compare_unreadable_file_exits_2(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert compare.main(str(bad), str(bad), plain=True) == 2


# --------------------------------------------------------------------------------------
# the machinery, in process
# --------------------------------------------------------------------------------------
def test_runner_every_mode_with_a_custom_shape():
    op = registry.load("attention")
    spec = op.parse_shape("B=1,H=2,Lq=24,Lk=40,d=72,mask=pad")
    assert spec.shape == AttnShape(1, 2, 24, 40, 72, mask="pad")
    cfg = runner.RunConfig(device="cpu", modes=["fwd", "bwd", "fwd+bwd"], backends=["eager", "sdpa-math"],
                           quick=True, warmup_ms=0.5, rep_ms=2.0)
    rows, not_timed, notes = runner.run(op, [spec], cfg)
    assert not not_timed and not notes
    assert [(r["mode"], r["backend"]) for r in rows] == [(m, b) for m in cfg.modes for b in cfg.backends]
    for r in rows:
        assert r["status"] == "ok", r["reason"]
        assert r["check"]["ok"] and r["check"].get("grads_finite", True)
        assert r["tflops"] > 0 and r["flops"] == flops.attention_flops(1, 2, 24, 40, 72, mode=r["mode"])


def test_runner_records_failures_as_skips():
    op = registry.load("attention")
    spec = op.parse_shape("B=1,H=2,L=16,d=64")  # d=64 is a power of two: triton-pad has nothing to do
    cfg = runner.RunConfig(device="cpu", backends=["triton-pad", "eager"], quick=True, warmup_ms=0.5, rep_ms=1.0)
    rows, not_timed, _ = runner.run(op, [spec], cfg)
    if "triton-pad" in not_timed:  # no interpreter in this process: not timed, with the reason
        assert "TRITON_INTERPRET" in not_timed["triton-pad"]
    else:
        pad = next(r for r in rows if r["backend"] == "triton-pad")
        assert pad["status"] == "skipped" and "power of two" in pad["reason"]
    assert next(r for r in rows if r["backend"] == "eager")["status"] == "ok"


def test_cpu_plan_scales_presets_and_keeps_head_dims():
    op = registry.load("attention")
    specs, skipped = runner.plan(op, ["blip2", "gemma3"], [], "cpu", quick=True)
    assert not skipped
    assert {s.shape.d for s in specs} == {88, 64, 72}
    assert all(s.shape.Lk <= 128 and s.scaled_from for s in specs)
    full, _ = runner.plan(op, ["gemma3"], [], "cpu", quick=True, full_size=True)
    assert full[0].shape == AttnShape(4, 16, 4096, 4096, 72) and full[0].scaled_from is None
    sweep, _ = runner.plan(op, ["sweep"], [], "cpu", quick=True)
    assert [s.shape.L for s in sweep] == [64, 128, 256] and not any(s.scaled_from for s in sweep)


def test_every_op_module_is_found_and_has_every_model_preset():
    assert registry.op_names()[:1] == ["attention"]
    assert {"attention", "qformer", "token_pool"} <= set(registry.op_names())
    for name in ("attention", "qformer", "token_pool"):
        try:
            op = registry.load(name)
        except registry.OpUnavailable as exc:
            pytest.skip(f"{name}: {exc}")
        # each model either has shapes or says why it has none
        assert set(registry.MODEL_PRESETS) <= set(op.presets), name


def test_qformer_and_token_pool_cases_run_on_cpu():
    for name, backends in (("qformer", ["eager", "sdpa"]), ("token_pool", ["eager"])):
        try:
            op = registry.load(name)
        except registry.OpUnavailable as exc:
            pytest.skip(f"{name}: {exc}")
        specs, _ = runner.plan(op, op.model_presets(), [], "cpu", quick=True)
        cfg = runner.RunConfig(device="cpu", modes=["fwd", "fwd+bwd"], backends=backends, quick=True,
                               warmup_ms=0.2, rep_ms=1.0)
        rows, _, _ = runner.run(op, specs[:2], cfg)
        assert rows and all(r["status"] == "ok" and r["check"]["ok"] for r in rows), rows


def test_bench_token_pool_quick_on_cpu(tmp_path):
    """`mmkernels bench token_pool --quick` (what gpu_check.sh's poolbench stage runs at full size):
    the issue's four reducers, fwd and fwd+bwd by default, GB/s and % of the copy bandwidth."""
    out = tmp_path / "tp.json"
    res = _run(["-m", "mmkernels", "bench", "token_pool", "--quick", "--json", str(out), "--plain"], tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    doc = json.loads(out.read_text())
    cases = doc["cases"]
    assert {c["preset"] for c in cases} == {"llava-ov", "gemma3", "internvl", "llava-video"}
    assert {c["mode"] for c in cases} == {"fwd", "fwd+bwd"} and {c["backend"] for c in cases} == {"eager"}
    assert all(c["status"] == "ok" and c["check"]["ok"] and c["gbps"] > 0 and c["pct_of_ceiling"] > 0
               for c in cases), cases
    assert {c["scaled_from"] for c in cases} == {  # the shapes, shrunk for the CPU
        "B=64 27x27 C=1152 bilinear ->14x14", "B=8 64x64 C=1152 avg k=4 rmsnorm",
        "B=16 cls+32x32 C=1024 merge k=2 layernorm", "B=64 24x24 C=1024 avg k=2"}
    assert "CUDA only" in doc["not_timed"]["compile"] and "triton" in doc["not_timed"]
    assert not any("PARTIAL" in n for n in doc["notes"])  # the per-case rewrites end with the full file


def test_token_pool_chains_bytes_budget_and_fused_note():
    """Each preset's eager chain (transformers' code) equals the float64 reference to float32
    rounding; the byte model is x + out (fwd) plus dout + dx (bwd); --budget-s stops starting
    cases; the faster fused backend is named per case."""
    try:
        op = registry.load("token_pool")
    except registry.OpUnavailable as exc:
        pytest.skip(str(exc))
    specs, _ = runner.plan(op, op.model_presets(), [], "cpu", quick=True)
    eager = op.make_backends()["eager"]
    for spec in specs:
        assert spec.shape.model == spec.preset  # the model's own chain, not the generic one
        # float32: Gemma3RMSNorm's .float() would round a float64 input to it anyway
        inp = op.make_inputs(spec.shape, torch.float32, "cpu", torch.Generator().manual_seed(0))
        got = op.bind(eager, spec.shape, inp, "cpu", False).fn()[0].double()
        torch.testing.assert_close(got, op.reference(spec.shape, inp), rtol=1e-5, atol=1e-5,
                                   msg=lambda m, p=spec.preset: f"{p}: {m}")
    video = op.presets["llava-video"][0].shape
    x, y = 64 * 576 * 1024, 64 * 144 * 1024
    assert op.bytes(video, 2, "fwd") == 2 * (x + y) and op.bytes(video, 2, "fwd+bwd") == 4 * (x + y)

    cfg = runner.RunConfig(device="cpu", backends=["eager"], quick=True, budget_s=1e-9)
    rows, _, _ = runner.run(op, specs[:1], cfg)
    assert rows and all("time budget" in r["reason"] for r in rows)

    row = {"preset": "gemma3", "case": "c", "dtype": "bfloat16", "mode": "fwd", "status": "ok", "check": {"ok": True}}
    (note,) = op.summary_notes([{**row, "backend": "triton", "ms_p50": 2.0}, {**row, "backend": "cuda", "ms_p50": 1.0},
                                {**row, "backend": "eager", "ms_p50": 0.5}])
    assert "gemma3/c bfloat16 fwd: cuda (1 ms vs triton 2 ms)" in note


def test_suite_params_skip_cleanly_when_the_op_is_absent(monkeypatch):
    import mmkernels

    monkeypatch.delattr(mmkernels, "qformer_cross_attention", raising=False)
    (p,) = suite.params("qformer")
    assert p.id == "unavailable" and "does not exist" in p.marks[0].kwargs["reason"]


def test_timing_and_flop_models():
    assert timing.quantiles([4.0, 1.0, 3.0, 2.0, 5.0], [0.5, 0.2, 0.8]) == [3.0, 1.8, 4.2]
    assert timing.rotation_count(1 << 20, "cpu") == 1
    t = timing.time_fn(lambda: sum(range(100)), "cpu", warmup_ms=0.1, rep_ms=1.0, min_reps=3)
    assert t.reps >= 3 and t.ms_p20 <= t.ms_p50 <= t.ms_p80 and t.timer == "perf_counter"
    # the attention convention is bench_attention.py's: 4·B·H·L²·d forward, halved when causal
    assert flops.attention_flops(2, 3, 5, 5, 8) == 4 * 2 * 3 * 25 * 8
    assert flops.attention_flops(2, 3, 5, 5, 8, causal=True, mode="fwd+bwd") == 3.5 * 0.5 * 4 * 2 * 3 * 25 * 8
    with pytest.raises(ValueError):
        flops.attention_flops(1, 1, 1, 1, 8, mode="backward")


def test_report_plain_table_csv_markdown_and_plot(tmp_path, capsys):
    doc = report.build_doc(
        op="attention", title="t", env_info={"device": {"name": "cpu: x", "type": "cpu"}, "versions": {"torch": "2"}},
        commit="abc", dirty=False, ceilings={"copy_gbps": 10.0, "matmul_tflops": 1.0, "matmul_dtype": "float32"},
        config={}, metric="tflops", convention="", not_timed={"triton": "no GPU"}, skipped_presets={}, notes=[],
        date="2026-01-01", rows=[
            {"key": f"attention/sweep/L{x}/float32/fwd/{b}", "preset": "sweep", "case": f"L{x}", "shape": "s",
             "dtype": "float32", "mode": "fwd", "backend": b, "status": "ok", "ms_p50": 1.0, "ms_p20": 0.9,
             "ms_p80": 1.1, "tflops": 0.5, "speedup_vs_eager": 1.0 if b == "eager" else 2.0, "x": x,
             "check": {"ok": True, "rel_err": 1e-7}} for x in (64, 128) for b in ("eager", "sdpa-flash")]
        + [{"key": "k", "preset": "sweep", "case": "L64", "shape": "s", "dtype": "float32", "mode": "fwd",
            "backend": "flex", "status": "skipped", "reason": "[bracketed] reason", "x": 64}])
    text = report.format_plain(doc)
    assert "not timed: triton: no GPU" in text and "[bracketed] reason" in text and "2.00x" in text
    report.write_csv(tmp_path / "r.csv", [doc])
    lines = (tmp_path / "r.csv").read_text().splitlines()
    assert lines[0].startswith("key,") and "commit" in lines[0] and len(lines) == 6
    report.write_json(tmp_path / "r.json", doc)
    assert _main(["bench", "show", str(tmp_path / "r.json"), "--markdown", "--brief"]) == 0
    md = capsys.readouterr().out
    assert "| preset | case |" in md and "| sweep | L64 |" in md and "flex" not in md  # timed cases only
    if report.matplotlib_missing():
        pytest.skip("matplotlib is not installed (the bench extra)")
    png = tmp_path / "p.png"
    report.plot([doc], png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_attention_script_still_works(tmp_path):
    """scripts/gpu_check.sh calls `python benchmarks/bench_attention.py --json FILE` (+ --resume,
    --budget-s, --summary-only): it runs on the shared backends of mmkernels.bench."""
    out = tmp_path / "ba.json"
    res = _run(["benchmarks/bench_attention.py", "--json", str(out), "--device", "cpu", "--quick", "--L", "64",
                "--d", "88", "--causal", "0", "--modes", "fwd,fwd+bwd", "--backends", "eager,sdpa-math"], tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    doc = json.loads(out.read_text())
    assert doc["suggested_result_path"].startswith("benchmarks/results/cpu-")
    assert [c["status"] for c in doc["cases"]] == ["ok"] * 4
    assert all(c["check"]["ok"] for c in doc["cases"])
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_attention", ROOT / "benchmarks" / "bench_attention.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_attention"] = mod  # its dataclasses look their module up
    try:
        spec.loader.exec_module(mod)  # main() runs only under __main__
    finally:
        sys.modules.pop("bench_attention", None)
    assert "cases: 4 ok" in mod.summary_text(doc)  # what --summary-only prints

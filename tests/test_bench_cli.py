"""``mmkernels bench`` (the one benchmark front-end), its machinery (mmkernels/bench/), the
pytest-benchmark suite on the same cases, and ``mmkernels info``'s ceilings. The ceilings go to a
private cache directory (they are cached per user)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from mmkernels.bench import cases, compare, report, runner, suite, timing
from mmkernels.bench.cases_attention import AttnShape, attention_flops

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """The CLI sets torch's thread count (1 on a CPU): give the rest of the session its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _main(argv: list[str]) -> int:
    from mmkernels.__main__ import main

    return main(argv)


def _cfg(**kw) -> runner.RunConfig:
    return runner.RunConfig(**{"device": "cpu", "quick": True, "warmup_ms": 0.2, "rep_ms": 1.0, **kw})


# --------------------------------------------------------------------------------------
# the command on a CPU machine
# --------------------------------------------------------------------------------------
def test_bench_attention_quick_json_on_cpu(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MMKERNELS_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "attn.json"
    t0 = time.perf_counter()
    assert _main(["bench", "attention", "--quick", "--json", str(out), "--plain"]) == 0
    assert time.perf_counter() - t0 < 30  # ~2 s on an idle 2-core machine
    stdout = capsys.readouterr().out
    doc = report.read_json(out)
    for field in ("date", "commit", "device", "versions", "ceilings", "config", "flop_convention", "cases"):
        assert field in doc, field
    assert doc["device"]["type"] == "cpu" and doc["versions"]["torch"] == torch.__version__
    # the ceilings are measured at the thread count the run uses, so no case exceeds 100 %
    assert doc["ceilings"]["threads"] == doc["config"]["threads"] == 1 and doc["ceilings"]["matmul_tflops"] > 0
    rows = doc["cases"]
    assert {c["backend"] for c in rows} == {"eager", "sdpa-flash", "sdpa-math"}
    for c in rows:
        assert c["status"] == "ok" and c["check"]["ok"] and c["scaled_from"], c
        assert 0 < c["ms_p20"] <= c["ms_p50"] <= c["ms_p80"]
        assert c["key"] == f"attention/{c['preset']}/{c['case']}/{c['dtype']}/{c['mode']}/{c['backend']}"
    assert all(c["speedup_vs_eager"] == pytest.approx(1.0) for c in rows if c["backend"] == "eager")
    # presets shrunk to one CPU shape are timed once, and the notes say so
    keys = [(c["shape"], c["dtype"], c["backend"]) for c in rows]
    assert len(keys) == len(set(keys))
    assert any("instructblip/eva-vitg: the same CPU shape as blip2/eva-vitg" in n for n in doc["notes"])
    # GPU kernels are named, with the reason: not runnable here, or (the tests' interpreter) left out
    triton_why = doc["not_timed"].get("triton") or doc["left_out"].get("triton")
    assert "TRITON_INTERPRET" in triton_why and "triton-pad" in doc["left_out"]
    assert any("not performance results" in n for n in doc["notes"]) and f"wrote {out}" in stdout
    assert max(len(line) for line in stdout.splitlines()) <= 100


def test_triton_timed_in_the_interpreter_is_not_listed_as_not_timed(tmp_path):
    """Under TRITON_INTERPRET=1 the named GPU kernels run (their check counts, their time does not);
    triton-pad goes through the launchers' split=False argument, forward and backward."""
    from mmkernels._utils import interpreting

    if not interpreting():
        pytest.skip("needs the Triton interpreter (tests/conftest.py turns it on without a GPU)")
    out = tmp_path / "i.json"
    assert _main(["bench", "attention", "--shape", "B=1,H=1,L=17,d=24", "--backends", "eager,triton,triton-pad",
                  "--mode", "fwd,fwd+bwd", "--quick", "--warmup-ms", "0", "--rep-ms", "0", "--no-ceilings",
                  "--json", str(out), "--plain"]) == 0
    doc = report.read_json(out)
    assert len(doc["cases"]) == 6
    for c in doc["cases"]:
        assert c["status"] == "ok" and c["check"]["ok"], c
        if c["mode"] == "fwd+bwd":  # gradients checked against float64 too
            assert all(c["check"][f"d{n}_rel_err"] < 1e-3 for n in "qkv"), c["check"]
    assert not doc["not_timed"]
    note = next(n for n in doc["notes"] if n.startswith("No CUDA device"))
    assert "not timed" not in note and "triton, triton-pad ran in the Triton interpreter" in note


def test_help_version_list_and_bad_arguments(capsys):
    with pytest.raises(SystemExit) as ex:
        _main(["bench", "--help"])
    assert ex.value.code == 0
    out = capsys.readouterr().out
    assert all(w in out for w in ("attention", "qformer_cross_attention (qformer)", "token_pool", "compare", "show"))
    with pytest.raises(SystemExit):
        _main(["--version"])
    assert capsys.readouterr().out.startswith("mmkernels 0.")
    assert _main(["bench", "attention", "--list", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "B=4 H=16 L=4096 d=72" in out and "sdpa-cudnn" in out and "cuda " not in out  # no attention CUDA ext
    for argv, err in ((["--preset", "nosuchmodel"], "unknown preset"), (["--backends", "nosuch"], "unknown backend"),
                      (["--shape", "B=1,H=2"], "missing Lq, Lk, d"), (["--mode", "backward"], "--mode"),
                      (["--resume"], "--resume needs --json")):
        assert _main(["bench", "attention", "--quick", *argv]) == 2
        assert err in capsys.readouterr().err


def test_op_alias(capsys):
    """``mmkernels bench qformer`` (the op's earlier name) is ``bench qformer_cross_attention``: same op,
    same case keys."""
    assert cases.load("qformer").name == "qformer_cross_attention"
    assert _main(["bench", "qformer", "--list", "--device", "cpu"]) == 0
    listed = capsys.readouterr().out
    assert _main(["bench", "qformer_cross_attention", "--list", "--device", "cpu"]) == 0
    assert listed == capsys.readouterr().out and listed.startswith("qformer_cross_attention: ")


def test_bench_missing_op_is_skipped_not_a_crash(tmp_path, capsys, monkeypatch):
    import mmkernels

    monkeypatch.delattr(mmkernels, "token_pool", raising=False)
    out = tmp_path / "tp.json"
    assert _main(["bench", "token_pool", "--quick", "--json", str(out)]) == 0
    assert "mmkernels.token_pool does not exist" in capsys.readouterr().out
    doc = report.read_json(out)
    assert doc["skipped"] and doc["cases"] == [] and doc["device"]["name"]
    (p,) = suite.params("token_pool")
    assert p.id == "unavailable" and "does not exist" in p.marks[0].kwargs["reason"]


def test_info_ceilings_are_cached_per_thread_count(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MMKERNELS_CACHE_DIR", str(tmp_path / "cache"))
    assert _main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    c = info["ceilings"]
    assert c["cached"] is False and c["copy_gbps"] > 0 and c["matmul_tflops"] > 0
    cpu = not torch.cuda.is_available()
    if cpu:  # the entry `mmkernels bench` (1 thread) divides by
        assert c["threads"] == 1 and c["key"].endswith("-1t")
    if not torch.version.cuda:  # no build switch helps a CPU-only torch: info does not suggest one
        assert "CPU-only" in info["cuda_extension"]["reason"]
        assert "MMKERNELS_JIT_BUILD" not in info["cuda_extension"]["reason"]
    cache = tmp_path / "cache" / "ceilings.json"
    assert json.loads(cache.read_text())[c["key"]]["measured"] == c["measured"]
    assert _main(["info", "--remeasure"]) == 0  # refreshes that same entry
    assert "measured now" in capsys.readouterr().out
    assert json.loads(cache.read_text())[c["key"]]["measured"] >= c["measured"]
    assert _main(["info", "--threads", "2", "--json"]) == 0
    if cpu:
        assert json.loads(capsys.readouterr().out)["ceilings"]["key"].endswith("-2t")
        assert len(json.loads(cache.read_text())) == 2  # one entry per thread count


# --------------------------------------------------------------------------------------
# compare: the performance gate, on the one schema
# --------------------------------------------------------------------------------------
def _doc(ms: dict[str, float], device="NVIDIA H100 80GB HBM3") -> dict:
    return {"schema": report.SCHEMA, "op": "attention", "device": {"name": device}, "commit": "abc",
            "date": "2026-01-01", "cases": [{"key": k, "status": "ok", "ms_p50": v} for k, v in ms.items()]}


def _write(path: Path, doc) -> str:
    path.write_text(json.dumps(doc))
    return str(path)


def test_compare_gate(tmp_path, capsys):
    keys = {"attention/llava15/clip-vitl336/bfloat16/fwd/triton": 1.0,
            "attention/gemma3/siglip-896/bfloat16/fwd/triton": 4.0}
    base = _write(tmp_path / "base.json", _doc(keys))
    slow = _write(tmp_path / "slow.json", _doc({k: v * (1.20 if "llava15" in k else 1.0) for k, v in keys.items()}))
    ok = _write(tmp_path / "ok.json", _doc({k: v * 1.05 for k, v in keys.items()}))
    assert _main(["bench", "compare", base, slow]) == 1
    out = capsys.readouterr().out
    assert "+20.0%" in out and "regressed" in out and "FAIL" in out and "siglip-896" in out  # every case printed
    assert compare.main(base, ok) == 0
    out = capsys.readouterr().out
    assert "+5.0%" in out and "PASS" in out
    assert _main(["bench", "compare", base, slow, "--threshold", "0.25"]) == 0
    # missing and new cases; --fail-on-missing
    new = _write(tmp_path / "new.json", _doc({"attention/llava15/clip-vitl336/bfloat16/fwd/triton": 1.0, "x": 1.0}))
    assert compare.main(base, new) == 0
    out = capsys.readouterr().out
    assert "missing" in out and " new" in out
    assert compare.main(base, new, fail_on_missing=True) == 1
    # only the one schema is read: anything else is an error (exit 2), not a silent pass
    pb = _write(tmp_path / "pb.json", {"benchmarks": [{"name": "t", "stats": {"median": 1e-3}}]})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert compare.main(base, pb) == 2 and compare.main(str(bad), base) == 2
    assert "not a `mmkernels bench --json` file" in capsys.readouterr().err


# --------------------------------------------------------------------------------------
# the machinery, in process
# --------------------------------------------------------------------------------------
def test_runner_every_mode_with_a_custom_shape_and_a_grad_check():
    op = cases.load("attention")
    spec = op.parse_shape("B=1,H=2,Lq=24,Lk=40,d=72,mask=pad")
    assert spec.shape == AttnShape(1, 2, 24, 40, 72, mask="pad")
    cfg = _cfg(modes=["fwd", "bwd", "fwd+bwd"], backends=["eager", "sdpa-math"])
    rows, not_timed, fatal = runner.run(op, [spec], cfg)
    assert not not_timed and not fatal
    assert [(r["mode"], r["backend"]) for r in rows] == [(m, b) for m in cfg.modes for b in cfg.backends]
    for r in rows:
        assert r["status"] == "ok" and r["check"]["ok"], r
        assert r["tflops"] > 0 and r["flops"] == attention_flops(1, 2, 24, 40, 72, mode=r["mode"])
        if r["mode"] != "fwd":
            assert all(r["check"][f"d{n}_rel_err"] < 1e-5 for n in "qkv")


def test_the_check_catches_a_wrong_kernel(monkeypatch):
    op = cases.load("attention")
    backends = op.backends()
    wrong = cases.Backend("wrong", "scales the eager output",
                          lambda s: lambda q, k, v: 1.01 * backends["eager"].call(s)(q, k, v))
    monkeypatch.setattr(op, "backends", lambda: {**backends, "wrong": wrong})
    (row,), _, _ = runner.run(op, [op.parse_shape("B=1,H=1,L=16,d=16")], _cfg(backends=["wrong"]))
    assert row["status"] == "ok" and not row["check"]["ok"] and row["check"]["rel_err"] > 5e-3
    assert "WRONG" in "\n".join(report.format_table({**report.new_doc("attention", "t", "cpu"), "cases": [row]}))


def test_resume_keeps_finished_cases_and_skips_the_one_that_died(tmp_path, capsys, monkeypatch):
    out = tmp_path / "r.json"
    argv = ["bench", "attention", "--shape", "B=1,H=2,L=16,d=64", "--backends", "eager,sdpa-math,sdpa-flash",
            "--quick", "--no-ceilings", "--json", str(out)]
    assert _main(argv) == 0
    doc = report.read_json(out)
    eager, math_, flash = doc["cases"]
    # a run that died in sdpa-math (a hang killed by the watchdog, a crash): the file says where
    eager["ms_p50"] = 123.0
    report.write_json(out, {**doc, "cases": [eager], "running": math_["key"]})
    assert _main([*argv, "--resume"]) == 0
    assert "1 case(s) kept" in capsys.readouterr().out
    kept, died, rerun = report.read_json(out)["cases"]
    assert kept["ms_p50"] == 123.0 and rerun["status"] == "ok" and rerun["key"] == flash["key"]
    assert died["status"] == "skipped" and "died" in died["reason"]
    # a CUDA fault: the rest is not run, the exit code is 3, and --resume runs what is left
    monkeypatch.setattr(runner, "cuda_alive", lambda device: False)
    monkeypatch.setattr(type(cases.load("attention")), "memory_guard", lambda *a: "pretend it failed")
    assert _main(argv) == 3
    doc = report.read_json(out)
    assert [c["status"] for c in doc["cases"]] == ["skipped", "not_run", "not_run"] and doc["fatal"]
    monkeypatch.undo()
    assert _main([*argv, "--resume"]) == 0
    assert [c["status"] for c in report.read_json(out)["cases"]] == ["skipped", "ok", "ok"]


def test_cpu_plan_scales_dedupes_and_sweeps():
    op = cases.load("attention")
    specs, skipped, notes = runner.plan(op, ["blip2", "instructblip", "gemma3"], [], "cpu", quick=True)
    assert not skipped and {s.shape.d for s in specs} == {88, 64, 72}
    assert all(s.shape.Lk <= 128 and s.scaled_from for s in specs)
    assert len({(s.shape, s.dtype) for s in specs}) == len(specs) and len(notes) == 2  # EVA and the cross-attn
    full, _, notes = runner.plan(op, ["blip2", "instructblip"], [], "cpu", quick=True, full_size=True)
    assert full[0].shape == AttnShape(32, 16, 257, 257, 88) and full[0].scaled_from is None
    assert notes == ["instructblip/eva-vitg: the same shape as blip2/eva-vitg (B=32 H=16 L=257 d=88), timed once there",
                     "instructblip/qformer-cross: the same shape as blip2/qformer-cross (B=32 H=12 Lq=32 Lk=257 "
                     "d=64), timed once there"]
    sweep, _, _ = runner.plan(op, ["sweep"], [], "cuda", quick=False)
    assert len(sweep) == 36 and {(s.shape.d, s.shape.H) for s in sweep} == {(64, 32), (128, 16), (88, 23)}
    assert all(s.shape.B * s.shape.Lq == 16384 for s in sweep)


def test_every_op_module_is_found_and_runs():
    assert cases.op_names()[0] == "attention" and {"qformer_cross_attention", "token_pool"} <= set(cases.op_names())
    for name in cases.op_names():
        try:
            op = cases.load(name)
        except cases.OpUnavailable as exc:
            pytest.skip(f"{name}: {exc}")
        assert set(cases.MODEL_PRESETS) <= set(op.presets), name  # shapes, or why the model has none
        specs, _, _ = runner.plan(op, op.model_presets(), [], "cpu", quick=True)
        backends = [b for b in op.suite_backends["cpu"] if b in op.backends()]
        modes = [m for m in ("fwd", "fwd+bwd") if m in op.suite_modes["cuda"]]  # prune: inference only
        rows, _, _ = runner.run(op, specs[:2], _cfg(modes=modes, backends=backends))
        assert rows and all(r["status"] == "ok" and r["check"]["ok"] for r in rows), rows


def test_token_pool_chains_bytes_budget_and_fused_note():
    """Each preset's eager chain (transformers' code) equals the float64 reference; the byte model
    is x + out (fwd) plus dout + dx (bwd); --budget-s stops starting cases; the faster fused
    backend is named per case."""
    op = cases.load("token_pool")
    specs, _, _ = runner.plan(op, op.model_presets(), [], "cpu", quick=True)
    eager = op.backends()["eager"]
    for spec in specs:
        assert spec.shape.model == spec.preset  # the model's own chain, not the generic one
        inp = op.make_inputs(spec.shape, torch.float32, "cpu", torch.Generator().manual_seed(0))
        got = op.bind(eager, spec.shape, inp, False).fn()[0].double()
        torch.testing.assert_close(got, op.reference(spec.shape, inp)[0], rtol=1e-5, atol=1e-5)
    video = op.presets["llava-video"][0].shape
    x, y = 64 * 576 * 1024, 64 * 144 * 1024
    assert op.bytes(video, 2, "fwd") == 2 * (x + y) and op.bytes(video, 2, "fwd+bwd") == 4 * (x + y)
    if not torch.version.cuda:  # no build switch helps a CPU-only torch, and none is suggested
        assert "CPU-only" in op.backends()["cuda"].why_not(torch.device("cpu"))
    rows, _, _ = runner.run(op, specs[:1], _cfg(backends=["eager"], budget_s=1e-9))
    assert rows and all(r["status"] == "not_run" and "time budget" in r["reason"] for r in rows)
    row = {"preset": "gemma3", "case": "c", "dtype": "bfloat16", "mode": "fwd", "status": "ok", "check": {"ok": True}}
    (note,) = op.summary_notes([{**row, "backend": "triton", "ms_p50": 2.0}, {**row, "backend": "cuda", "ms_p50": 1.0},
                                {**row, "backend": "eager", "ms_p50": 0.5}])
    assert "gemma3/c bfloat16 fwd: cuda (1 ms vs triton 2 ms)" in note


def test_suite_runs_the_cli_case_definitions(tmp_path, monkeypatch):
    """benchmarks/: the CLI's cases through the CLI's runner, written as the one JSON schema
    (benchmarks/conftest.py's --mmk-json), which the gate reads."""
    import importlib.util
    from types import SimpleNamespace

    class Benchmark:  # pytest-benchmark's fixture, as much of it as suite.run uses
        extra_info: dict = {}

        def pedantic(self, target, setup, rounds, warmup_rounds, iterations):
            setup()
            target()

    monkeypatch.setenv("MMKERNELS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(suite, "ROWS", [])
    params = [p.values[0] for p in suite.params("attention") if p.id.startswith("llava15-")]
    assert [str(c) for c in params] == ["llava15-clip-vitl336-fwd-eager", "llava15-clip-vitl336-fwd-sdpa"]
    for case in params:
        suite.run(Benchmark(), case)
    spec = importlib.util.spec_from_file_location("bench_conftest", ROOT / "benchmarks" / "conftest.py")
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    out = tmp_path / "suite.json"
    conftest.pytest_sessionfinish(SimpleNamespace(config=SimpleNamespace(getoption=lambda name: str(out))))
    doc = report.read_json(out)
    assert [c["key"] for c in doc["cases"]] == ["attention/llava15/clip-vitl336/float32/fwd/eager",
                                                "attention/llava15/clip-vitl336/float32/fwd/sdpa"]
    assert all(c["status"] == "ok" and c["check"]["ok"] for c in doc["cases"])
    assert compare.main(str(out), str(out)) == 0


def test_timing_report_csv_markdown_and_plot(tmp_path, capsys):
    assert timing.quantiles([4.0, 1.0, 3.0, 2.0, 5.0], [0.5, 0.2, 0.8]) == [3.0, 1.8, 4.2]
    assert timing.rotation_count(1 << 20, "cpu") == 1
    t = timing.time_fn(lambda: sum(range(100)), "cpu", warmup_ms=0.1, rep_ms=1.0, min_reps=3)
    assert t.reps >= 3 and t.ms_p20 <= t.ms_p50 <= t.ms_p80 and t.timer == "perf_counter"
    assert attention_flops(2, 3, 5, 5, 8, causal=True, mode="fwd+bwd") == 3.5 * 0.5 * 4 * 2 * 3 * 25 * 8
    doc = {**report.new_doc("attention", "t", "cpu"), "metric": "tflops", "not_timed": {"triton": "no GPU"},
           "ceilings": {"copy_gbps": 10.0, "matmul_tflops": 1.0, "matmul_dtype": "float32"}, "cases": [
               {"key": f"attention/sweep/L{x}/float32/fwd/{b}", "preset": "sweep", "case": f"L{x}", "shape": "s",
                "dtype": "float32", "mode": "fwd", "backend": b, "status": "ok", "ms_p50": 1.0, "ms_p20": 0.9,
                "ms_p80": 1.1, "tflops": 0.5, "speedup_vs_eager": 1.0 if b == "eager" else 2.0, "x": x,
                "check": {"ok": True, "rel_err": 1e-7}} for x in (64, 128) for b in ("eager", "sdpa-flash")]
           + [{"key": "k", "preset": "sweep", "case": "L64", "shape": "s", "dtype": "float32", "mode": "fwd",
               "backend": "flex", "status": "skipped", "reason": "[bracketed] reason " * 20, "x": 64}]}
    lines = report.format_table(doc)
    assert max(map(len, lines)) <= 100
    text = "\n".join(lines)
    assert "not timed: triton: no GPU" in text and "[bracketed] reason" in text and "2.00x" in text
    report.write_csv(tmp_path / "r.csv", [doc])
    csv_lines = (tmp_path / "r.csv").read_text().splitlines()
    assert csv_lines[0].startswith("key,") and "commit" in csv_lines[0] and len(csv_lines) == 6
    report.write_json(tmp_path / "r.json", doc)
    assert _main(["bench", "show", str(tmp_path / "r.json"), "--markdown"]) == 0
    md = capsys.readouterr().out
    assert "| case | shape |" in md and "| sweep/L64 | s |" in md and "flex" not in md  # timed cases only
    if report.matplotlib_missing():
        pytest.skip("matplotlib is not installed (the bench extra)")
    assert report.plot([doc], tmp_path / "p.png") and (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


# --------------------------------------------------------------------------------------
# a newcomer's rough edges: spellings, typos, empty shapes, other files, stale ceilings
# --------------------------------------------------------------------------------------
def test_dtype_spellings_are_accepted_everywhere(tmp_path, capsys):
    assert [cases.dtype_name(s) for s in ("bf16", "bfloat16", "torch.bfloat16", "fp16", "float16", "half", "fp32",
                                          "float32", "float", "BF16")] == \
        ["bfloat16"] * 3 + ["float16"] * 3 + ["float32"] * 3 + ["bfloat16"]
    with pytest.raises(ValueError, match="bf16/bfloat16"):
        cases.dtype_name("int8")
    out = tmp_path / "bf16.json"
    assert _main(["bench", "attention", "--shape", "B=1,H=1,L=16,d=16", "--backends", "eager", "--dtype", "bf16",
                  "--quick", "--warmup-ms", "0", "--rep-ms", "0", "--no-ceilings", "--json", str(out), "--plain",
                  "--quiet"]) == 0
    assert [c["dtype"] for c in report.read_json(out)["cases"]] == ["bfloat16"]
    with pytest.raises(SystemExit) as ex:
        _main(["bench", "attention", "--dtype", "int8"])
    assert ex.value.code == 2 and "bf16/bfloat16, fp16/float16/half" in capsys.readouterr().err


def test_main_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        _main(["--help"])
    out = capsys.readouterr().out
    assert all(f"    {c} " in out for c in ("info", "bench", "inspect")), out


def test_empty_shape_is_a_clear_error_and_failed_inputs_name_the_reason(capsys):
    for op, shape in (("attention", "B=0,H=2,L=16,d=64"), ("attention", "B=1,H=2,L=16,d=0"),
                      ("token_pool", "B=1,h=0,C=8"), ("attention_varlen", "seqlens=0:0,H=2,d=16")):
        assert _main(["bench", op, "--shape", shape, "--quick"]) == 2, shape
        assert "at least 1" in capsys.readouterr().err, shape
    # a shape whose inputs cannot be built: every backend of it says why (it was "not run: None")
    op = cases.load("attention")
    spec = cases.ShapeSpec("custom", "empty", "", AttnShape(0, 2, 16, 16, 64))
    rows, _, _ = runner.run(op, [spec], _cfg(backends=["eager", "sdpa-math"]))
    assert [r["status"] for r in rows] == ["skipped", "skipped"]
    assert all(r["reason"] and "inputs/reference failed" in r["reason"] for r in rows), rows
    lines = report.format_table({**report.new_doc("attention", "t", "cpu"), "cases": rows})
    assert not any("None" in line for line in lines if "skipped:" in line)


def test_show_says_what_it_reads(tmp_path, capsys):
    csv_file = tmp_path / "a.csv"
    csv_file.write_text("key,ms_p50\nx,1\n")
    assert _main(["bench", "show", str(csv_file)]) == 2
    err = capsys.readouterr().err
    assert "not JSON" in err and "--json FILE" in err and "--csv" in err
    assert _main(["bench", "show", str(tmp_path / "missing.json")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_footer_counts_skipped_presets_apart_from_cases():
    doc = {**report.new_doc("qformer_cross_attention", "t", "cpu"), "skipped_presets": {"llava15": "no Q-Former"},
           "cases": [{"key": "k", "preset": "blip2", "case": "c", "dtype": "float32", "mode": "fwd",
                      "backend": "eager", "status": "ok", "ms_p50": 1.0, "ms_p20": 1.0, "ms_p80": 1.0,
                      "shape": "s"}]}
    last = report.footer_lines(doc)[-1]
    assert last.startswith("1 case(s) timed, 0 case(s) skipped, 0 not run, 1 preset(s) skipped"), last


def test_figures_over_a_ceiling_and_noisy_baselines_are_flagged():
    row = {"preset": "p", "case": "c", "dtype": "float32", "mode": "fwd", "status": "ok", "shape": "s"}
    cases_ = [{**row, "key": "e", "backend": "eager", "ms_p50": 40.0, "ms_p20": 5.0, "ms_p80": 60.0,
               "pct_of_ceiling": 3.0, "speedup_vs_eager": 1.0},
              {**row, "key": "s", "backend": "sdpa-flash", "ms_p50": 0.03, "ms_p20": 0.03, "ms_p80": 0.03,
               "pct_of_ceiling": 851.0, "speedup_vs_eager": 1385.0}]
    doc = {**report.new_doc("attention", "t", "cpu"), "cases": cases_,
           "ceilings": {"copy_gbps": 1.0, "matmul_tflops": 0.001, "matmul_dtype": "float32", "cached": True}}
    text = "\n".join(report.format_table(doc))
    assert "851%*" in text and "1385.00x?" in text
    assert "ceiling stale" in text and "mmkernels info --remeasure" in text and "x eager marked ?" in text
    assert "851%*" in report.format_markdown(doc)


def test_stale_cached_ceilings_are_measured_again(tmp_path, monkeypatch):
    """A ceiling cached while the machine was busy reads far too low: the run re-measures it."""
    from mmkernels.bench import env

    monkeypatch.setenv("MMKERNELS_CACHE_DIR", str(tmp_path))
    torch.set_num_threads(1)
    key = env.device_slug("cpu")
    stale = {"copy_gbps": 1e-6, "matmul_tflops": 1e-9, "matmul_dtype": "float32", "threads": 1,
             "measured": "2020-01-01T00:00:00+00:00"}
    (tmp_path / "ceilings.json").write_text(json.dumps({key: stale}))
    out = tmp_path / "r.json"
    assert _main(["bench", "attention", "--shape", "B=1,H=1,L=32,d=16", "--backends", "eager", "--quick",
                  "--json", str(out), "--plain", "--quiet"]) == 0
    doc = report.read_json(out)
    assert doc["ceilings"]["matmul_tflops"] > 1e-6 and doc["ceilings"]["measured"] != stale["measured"]
    assert any(n.startswith("ceilings re-measured after the run") for n in doc["notes"])
    assert doc["cases"][0]["pct_of_ceiling"] < 1e6
    assert json.loads((tmp_path / "ceilings.json").read_text())[key]["matmul_tflops"] > 1e-6


def test_compile_is_opt_in_on_a_cpu_and_runs_when_named(monkeypatch):
    monkeypatch.delenv("MMK_BENCH_COMPILE_CPU", raising=False)
    from mmkernels.bench.cli import _defaults

    op = cases.load("token_pool")
    names, left_out = _defaults(op, torch.device("cpu"))
    assert "compile" not in names and "--backends" in left_out["compile"]
    assert op.backends()["compile"].why_not(torch.device("cpu")) is None  # so a named one is timed


@pytest.mark.slow
def test_compile_named_on_a_cpu_is_timed(tmp_path, monkeypatch):
    """``--backends eager,compile`` times torch.compile on a CPU (inductor's C++ build: ~10 s)."""
    monkeypatch.delenv("MMK_BENCH_COMPILE_CPU", raising=False)
    out = tmp_path / "c.json"
    assert _main(["bench", "token_pool", "--shape", "B=1,h=8,C=16,mode=avg,k=2", "--backends", "eager,compile",
                  "--mode", "fwd", "--quick", "--no-ceilings", "--json", str(out), "--plain", "--quiet"]) == 0
    rows = report.read_json(out)["cases"]
    assert [(r["backend"], r["status"]) for r in rows] == [("eager", "ok"), ("compile", "ok")], rows


def test_fwd_only_backend_and_its_own_bound(monkeypatch):
    """``Backend.fwd_only``: its fwd+bwd rows are skipped with that reason; ``out_rtol``: the check's
    bound (recorded as ``tol``), not the dtype's; the qwen3vl-tower packs of one sequence run the dense
    SDPA backend on the CPU (issue 22)."""
    from dataclasses import replace

    op = cases.load("attention_varlen")
    specs, _, _ = runner.plan(op, ["qwen3vl-tower"], [], "cpu", quick=True)
    assert specs and all(len(s.shape.seqlens) == 1 and s.shape.d == 72 for s in specs)
    bk = op.backends()
    assert bk["triton-fp8"].fwd_only and bk["triton-scores"].fwd_only and bk["triton-fp8"].out_rtol
    loose = replace(bk["hf-loop"], name="loose", fwd_only="forward only here", out_rtol=-1.0)  # < 0: fails
    monkeypatch.setattr(type(op), "backends", lambda self: {**bk, "loose": loose})
    rows, _, _ = runner.run(op, specs[:1], _cfg(modes=["fwd", "fwd+bwd"], backends=["sdpa-flash", "loose"]))
    by = {(r["backend"], r["mode"]): r for r in rows}
    assert by["sdpa-flash", "fwd"]["check"]["ok"] and by["sdpa-flash", "fwd+bwd"]["check"]["ok"]
    assert by["loose", "fwd"]["check"]["tol"] == -1.0 and not by["loose", "fwd"]["check"]["ok"]
    assert by["loose", "fwd+bwd"]["status"] == "skipped" and by["loose", "fwd+bwd"]["reason"] == "forward only here"

"""Packaging, the ``mmkernels info`` command, the CUDA-extension loader and forced dispatch.

Whatever depends on the process environment (no GPU visible, ``TRITON_INTERPRET`` unset:
``tests/conftest.py`` sets it to 1 in this process) runs in a subprocess.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mmkernels
from mmkernels import _ext, dispatch
from mmkernels.tools import info

ROOT = Path(__file__).resolve().parents[1]


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment with no GPU visible, no interpreter, no forced backend."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "MMKERNELS_BACKEND", "MMKERNELS_JIT_BUILD")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def _run(args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT,
                          env=_clean_env(**env), timeout=120)


def _all_backend_names() -> set[str]:
    return {b.name for op in dispatch._registry for b in dispatch.backends(op)}


# --------------------------------------------------------------------------------------
# import and dispatch without a GPU
# --------------------------------------------------------------------------------------
_NO_GPU_SCRIPT = r"""
import json, sys, warnings
import torch
import mmkernels as mk

out = {"kernels_loaded": sorted(m for m in sys.modules if m.startswith("mmkernels.kernels."))}
q = k = v = torch.randn(1, 2, 8, 16)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    ref = mk.attention(q, k, v)  # auto: Triton is not an option here, silently
out["auto_warnings"] = [str(w.message) for w in caught]
out["auto_close"] = bool(torch.allclose(ref, torch.nn.functional.scaled_dot_product_attention(q, k, v), atol=1e-5))
errors = {}
try:
    with mk.use_backend("triton"):
        mk.attention(q, k, v)
except mk.BackendNotSupportedError as exc:
    errors["use_backend"] = str(exc)
try:
    mk.attention(q, k, v, backend="triton")
except mk.BackendNotSupportedError as exc:
    errors["argument"] = str(exc)
out["errors"] = errors
print(json.dumps(out))
"""


def test_import_and_forced_triton_without_gpu_or_interpreter():
    res = _run(["-c", _NO_GPU_SCRIPT], TRITON_INTERPRET="0")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["kernels_loaded"] == [], "import mmkernels must not import the Triton kernel modules"
    # falling back from Triton on CPU is the expected route, not worth a warning
    assert not [w for w in out["auto_warnings"] if "triton" in w] and out["auto_close"]
    assert set(out["errors"]) == {"use_backend", "argument"}, "a forced triton on CPU must raise"
    for msg in out["errors"].values():
        assert "'triton'" in msg and "TRITON_INTERPRET=1" in msg, msg


def test_forced_backend_from_environment_without_interpreter():
    code = ("import torch, mmkernels as mk\nq = torch.randn(1, 1, 4, 8)\n"
            "try:\n    mk.attention(q, q, q)\nexcept mk.BackendNotSupportedError as e:\n    print('RAISED', e)\n")
    res = _run(["-c", code], TRITON_INTERPRET="0", MMKERNELS_BACKEND="triton")
    assert res.returncode == 0, res.stderr
    assert "RAISED" in res.stdout and "TRITON_INTERPRET=1" in res.stdout


def test_use_backend_rejects_unknown_names(monkeypatch):
    with pytest.raises(ValueError, match="bogus"):
        with mmkernels.use_backend("bogus"):
            pass
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="bogus"):
        mmkernels.attention(q, q, q, backend="bogus")
    monkeypatch.setenv("MMKERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="MMKERNELS_BACKEND|bogus"):
        mmkernels.attention(q, q, q)


def test_forcing_a_backend_the_op_lacks_raises():
    if "cuda" in {b.name for b in dispatch.backends("attention")}:
        pytest.skip("attention has a cuda backend now")
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(dispatch.BackendNotSupportedError, match="no such backend"):
        with mmkernels.use_backend("cuda"):
            mmkernels.attention(q, q, q)


_IMPORT_SCRIPT = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import mmkernels
t2 = time.perf_counter()
print(json.dumps({m: m in sys.modules for m in ("torch._dynamo", "torch._inductor", "triton", "transformers")}
                 | {"torch_s": t1 - t0, "mmkernels_s": t2 - t1}))
"""


def test_import_loads_neither_dynamo_nor_triton():
    """``import mmkernels`` costs ~0.1 s over ``import torch``: torch._dynamo (~1.7 s: it was pulled in
    by ``@torch.compiler.assume_constant_result`` at import) and triton are imported when used."""
    res = _run(["-c", _IMPORT_SCRIPT])
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    for module in ("torch._dynamo", "torch._inductor", "triton", "transformers"):
        assert out[module] is False, f"import mmkernels imported {module}"


def test_assume_constant_result_without_dynamo_marks_the_same_attribute():
    """ops/token_pool.py marks ``_cuda_unavailable`` as torch.compiler.assume_constant_result does,
    without importing torch._dynamo: the attribute dynamo reads must still be the one torch sets."""
    tp = importlib.import_module("mmkernels.ops.token_pool")  # (mmkernels.ops.token_pool is also the function)

    def f():
        return 1

    marked = torch.compiler.assume_constant_result(f)
    attrs = {k for k in vars(marked) if "dynamo" in k}
    assert attrs == {"_dynamo_marked_constant"} and marked._dynamo_marked_constant is True
    assert tp._cuda_unavailable._dynamo_marked_constant is True
    from mmkernels import _utils

    assert _utils.triton_import_error._dynamo_marked_constant is True


def test_first_call_compiled_then_eager_does_not_recompile():
    """A process whose first mmkernels call is compiled, then eager: the triton-import cache the
    eager call fills is not a guard of the compiled function (one frame, no recompile)."""
    code = (
        "import os; os.environ['TRITON_INTERPRET'] = '1'\n"
        "import torch, mmkernels as mk\n"
        "from torch._dynamo.utils import counters\n"
        "q = torch.randn(10, 2, 16); cu = torch.tensor([0, 4, 10], dtype=torch.int32)\n"
        "f = torch.compile(lambda q, cu: mk.attention_varlen(q, q, q, cu, cu), backend='eager')\n"
        "f(q, cu); mk.attention_varlen(q, q, q, cu, cu); f(q, cu)\n"
        "print('frames', counters['frames']['ok'])\n"
    )
    res = _run(["-c", code])
    assert res.returncode == 0, res.stderr
    assert "frames 1" in res.stdout, res.stdout + res.stderr


# --------------------------------------------------------------------------------------
# python -m mmkernels info
# --------------------------------------------------------------------------------------
def test_info_text_names_every_backend():
    res = _run(["-m", "mmkernels", "info"])
    assert res.returncode == 0, res.stderr
    text = res.stdout
    for word in (f"mmkernels {mmkernels.__version__}", torch.__version__, "TRITON_INTERPRET", "CUDA extension",
                 "no CUDA device"):
        assert word in text, word
    for op in dispatch._registry:
        assert op in text
    for name in _all_backend_names():
        assert f"    {name} " in text, name


def test_info_json_without_gpu_or_interpreter():
    res = _run(["-m", "mmkernels", "info", "--json"])
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["mmkernels"] == mmkernels.__version__
    assert data["torch"] == torch.__version__
    assert data["cuda"]["device_count"] == 0 and data["cuda"]["driver"] is None
    assert data["triton_interpret"]["enabled"] is False
    assert isinstance(data["cuda_extension"]["reason"], str)
    assert set(data["ops"]) == set(dispatch._registry)
    att = data["ops"]["attention"]
    assert att["probe_ran"] and att["auto"] in ("sdpa", "reference")
    rows = {b["name"]: b for b in att["backends"]}
    assert [b.name for b in dispatch.backends("attention")] == [b["name"] for b in att["backends"]]
    if "triton" in rows and rows["triton"]["available"]:
        assert rows["triton"]["probe_ok"] is False
        assert any("TRITON_INTERPRET=1" in r for r in rows["triton"]["probe_reasons"])
    assert rows["reference"]["probe_ok"] is True
    # one rule for every op: each is probed, and no op's Triton backend reads usable on a CPU
    # without the interpreter (attention_scores / attention_varlen said "available")
    for op, o in data["ops"].items():
        assert o["probe_ran"], op
        for b in o["backends"]:
            if b["name"] in ("triton", "cuda") and b["available"]:
                assert b["probe_ok"] is False and b["probe_reasons"], (op, b)


def test_info_collect_in_process_triton_usable():
    """Here the interpreter is on (conftest) or a GPU is present: the Triton probe passes."""
    data = info.collect()
    json.dumps(data)  # serialisable
    rows = {b["name"]: b for b in data["ops"]["attention"]["backends"]}
    if rows["triton"]["available"]:
        assert rows["triton"]["probe_ok"], rows["triton"]
        assert data["ops"]["attention"]["auto"] is not None
    text = info.format_text(data)
    assert "auto mode picks" in text


def test_info_probe_leaves_dispatch_intact():
    select = dispatch.select
    info.collect()
    assert dispatch.select is select


def test_cli_without_subcommand_prints_help(capsys):
    from mmkernels.__main__ import main

    assert main([]) == 2
    assert "info" in capsys.readouterr().out


def test_console_script_entry_point():
    try:
        eps = importlib.metadata.entry_points(group="console_scripts", name="mmkernels")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        eps = ()
    if not eps:
        pytest.skip("mmkernels is not pip-installed here (run scripts/install.sh)")
    (ep,) = eps
    assert ep.value == "mmkernels.__main__:main"


# --------------------------------------------------------------------------------------
# the optional CUDA extension
# --------------------------------------------------------------------------------------
@pytest.fixture
def fresh_ext(monkeypatch):
    monkeypatch.delenv("MMKERNELS_JIT_BUILD", raising=False)
    _ext._reset_for_tests()
    yield _ext
    _ext._reset_for_tests()


def test_ext_reports_why_not(fresh_ext):
    mod = fresh_ext.load()
    assert isinstance(fresh_ext.available(), bool)
    reason = fresh_ext.unavailable_reason()
    assert isinstance(reason, str)
    if mod is None or not torch.cuda.is_available():
        assert reason and not fresh_ext.available()


def test_ext_import_error_is_reported_not_raised(fresh_ext, monkeypatch):
    def broken():
        raise OSError("_C.so: undefined symbol: _ZN3c10whatever")

    monkeypatch.setattr(fresh_ext, "_import_extension", broken)
    assert fresh_ext.load() is None
    assert "undefined symbol" in fresh_ext.unavailable_reason()
    assert fresh_ext.available() is False


@pytest.mark.skipif(bool(torch.version.cuda), reason="checks the CPU-only torch message")
def test_ext_on_cpu_torch_does_not_suggest_a_jit_build(fresh_ext):
    assert fresh_ext.load() is None
    reason = fresh_ext.unavailable_reason()
    assert "CPU-only" in reason and "MMKERNELS_JIT_BUILD" not in reason, reason


@pytest.mark.skipif(bool(torch.version.cuda), reason="with CUDA torch a JIT build could really start")
def test_ext_jit_build_needs_cuda(fresh_ext, monkeypatch):
    monkeypatch.setenv("MMKERNELS_JIT_BUILD", "1")
    monkeypatch.setattr(fresh_ext, "_sources", lambda: ["/nonexistent/kernel.cu"])
    assert fresh_ext.load() is None
    assert "built without CUDA" in fresh_ext.unavailable_reason()


# --------------------------------------------------------------------------------------
# setup.py and pyproject.toml
# --------------------------------------------------------------------------------------
@pytest.fixture
def setup_module(monkeypatch):
    for var in ("MMKERNELS_SKIP_CUDA_BUILD", "MMKERNELS_FORCE_CUDA"):
        monkeypatch.delenv(var, raising=False)
    spec = importlib.util.spec_from_file_location("_mmkernels_setup", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # setup() runs only under __main__
    return mod


def test_setup_decision(setup_module, monkeypatch, tmp_path):
    empty, full = tmp_path / "empty", tmp_path / "full"
    empty.mkdir()
    full.mkdir()
    (full / "kernel.cu").write_text("// test\n")
    (full / "bindings.cpp").write_text("// test\n")
    (full / "notes.txt").write_text("not a source\n")

    assert setup_module.cuda_build_decision(str(empty)) == (False, "csrc/ has no .cu/.cpp sources")
    assert [Path(p).name for p in setup_module.cuda_sources(str(full))] == ["bindings.cpp", "kernel.cu"]
    build, why = setup_module.cuda_build_decision(str(full))
    if not torch.version.cuda:
        assert not build and "without CUDA" in why
    monkeypatch.setenv("MMKERNELS_FORCE_CUDA", "1")
    assert setup_module.cuda_build_decision(str(full)) == (True, "MMKERNELS_FORCE_CUDA=1")
    monkeypatch.setenv("MMKERNELS_SKIP_CUDA_BUILD", "1")
    assert setup_module.cuda_build_decision(str(full)) == (False, "MMKERNELS_SKIP_CUDA_BUILD=1")
    assert setup_module.cuda_extension_kwargs() == {}
    assert setup_module.default_max_jobs() >= 1


def test_setup_py_version_with_skip():
    res = _run(["setup.py", "--version"], MMKERNELS_SKIP_CUDA_BUILD="1")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1].endswith(mmkernels.__version__)
    assert "not building the CUDA extension" in res.stderr


def test_pyproject_metadata():
    tomllib = pytest.importorskip("tomllib")
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    requires = data["build-system"]["requires"]
    assert not any(r.split()[0].startswith("torch") for r in requires), "a plain pip install must not fetch torch"
    project = data["project"]
    assert project["scripts"]["mmkernels"] == "mmkernels.__main__:main"
    assert {"dev", "hf", "bench", "timm"} <= set(project["optional-dependencies"])
    assert any(d.startswith("torch") for d in project["dependencies"])


def test_dispatch_explain_and_record():
    """The public hooks: explain() says which backend would run and why the others would not,
    without running; record() lists the backend each call ran on."""
    import mmkernels as mk

    q = torch.randn(1, 2, 5, 16)
    exp = mk.dispatch.explain("attention", q, q, q, is_causal=True)
    assert exp.op == "attention" and exp.chosen in ("triton", "sdpa") and exp.forced is None
    assert set(exp.reasons) == {"triton", "sdpa", "reference"} and exp.reasons["reference"] == []
    assert "runs on" in str(exp)
    forced = mk.dispatch.explain("attention", q.double(), q.double(), q.double(), backend="triton")
    assert forced.chosen is None and forced.forced == "triton" and forced.reasons["triton"]
    with pytest.raises(ValueError, match="query"):  # validation still runs
        mk.dispatch.explain("attention", q[0, 0, 0], q, q)
    with pytest.raises(ValueError, match="op: 'nope'"):
        mk.dispatch.explain("nope")
    with mk.dispatch.record() as calls, mk.dispatch.record(with_inputs=True) as detailed:
        mk.attention(q, q, q, backend="reference")
        mk.token_pool(torch.randn(1, 16, 8), backend="reference")
    assert calls == [("attention", "reference"), ("token_pool", "reference")]
    assert detailed[0][2]["query"] is q
    assert not mk.dispatch._recorders and not mk.dispatch._explaining

"""mmkernels inside the serving engines: vLLM's ``MMEncoderAttention`` (``MMKERNELS_VLLM=1`` +
the ``vllm.general_plugins`` entry point) and SGLang's ``--mm-attention-backend mmkernels``
(the ``sglang.srt.plugins`` entry point).  See docs/engines.md.

Three groups:

* engine-free (run everywhere, normal CI): importing never loads an engine, the env switch,
  the signature check on fake classes, and the SGLang backend class's call forms (it needs no
  SGLang to run) against a float64 per-sequence reference;
* vLLM (skipped unless vLLM imports here) and SGLang (skipped unless SGLang imports here): the
  real engines on CPU — entry points found in a fresh process, the engine's own layer
  construction yielding our class, the engine's own Qwen2-VL / Qwen2.5-VL / Qwen3-VL vision
  towers with random weights equal with and without the plug-in (2x rule against float64), one
  Triton launch (interpreter) per layer, padded metadata, vLLM's compiled (fullgraph) path.

``bash scripts/engine_tests.sh`` builds the engines' venvs (cached outside the repo) and runs
this file in each.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import math
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from mmkernels.integrations import sglang as mk_sglang
from mmkernels.integrations import vllm as mk_vllm

ROOT = Path(__file__).resolve().parents[1]
HAS_VLLM = importlib.util.find_spec("vllm") is not None
HAS_SGLANG = importlib.util.find_spec("sglang") is not None
_HOW = "bash scripts/engine_tests.sh runs these in the engine's own venv"
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason=f"vLLM is not installed in this Python; {_HOW}")
needs_sglang = pytest.mark.skipif(not HAS_SGLANG, reason=f"SGLang is not installed in this Python; {_HOW}")


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _reference(q, k, v, cu, scale):
    """float64 per-sequence SDPA over (total, H, D) packed rows (GQA by repetition)."""
    q, k, v = (t.double() for t in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[-1], dtype=torch.float64)
    bounds = [int(c) for c in cu]
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e > s:
            qs, ks, vs = (t[s:e].transpose(0, 1) for t in (q, k, v))
            ks, vs = ks.repeat_interleave(rep, 0), vs.repeat_interleave(rep, 0)
            out[s:e] = F.scaled_dot_product_attention(qs, ks, vs, scale=scale).transpose(0, 1)
    return out


def _worst(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


class _LaunchCounter:
    """Stands in for the packed forward @triton.jit kernel and counts ``kernel[grid]``."""

    def __init__(self, fn):
        self.fn, self.count = fn, 0

    def __getitem__(self, grid):
        self.count += 1
        return self.fn[grid]


@pytest.fixture
def launches(monkeypatch):
    from mmkernels.kernels import attention_varlen as kv

    counter = _LaunchCounter(kv._KERNELS["fwd"])
    monkeypatch.setitem(kv._KERNELS, "fwd", counter)
    return counter


def _figure(line: str) -> None:
    """A measured figure: printed (pytest -s) and appended to $MMK_ENGINE_FIGURES when set
    (scripts/engine_tests.sh prints that file after the tests)."""
    print(line)
    path = os.environ.get("MMK_ENGINE_FIGURES")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


def _run(code: str, env_extra: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.update(env_extra)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=tempfile.gettempdir())


# --------------------------------------------------------------------------------------------
# engine-free
# --------------------------------------------------------------------------------------------
def test_import_never_loads_an_engine():
    res = _run("""
        import sys
        import mmkernels, mmkernels.integrations.vllm, mmkernels.integrations.sglang
        assert not {"vllm", "sglang"} & set(sys.modules), sorted({"vllm", "sglang"} & set(sys.modules))
        print("clean")
    """, {})
    assert res.returncode == 0 and "clean" in res.stdout, res.stderr[-2000:]


@pytest.mark.parametrize("value", [None, "", "0"])
def test_vllm_switch_off(monkeypatch, caplog, value):
    if value is None:
        monkeypatch.delenv(mk_vllm.ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(mk_vllm.ENV_VAR, value)
    with caplog.at_level(logging.DEBUG, logger=mk_vllm.logger.name):
        assert mk_vllm.register() is False
    assert not mk_vllm.enabled()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("value", ["true", "yes", "2", " 1"])
def test_vllm_switch_is_exactly_1(monkeypatch, caplog, value):
    monkeypatch.setenv(mk_vllm.ENV_VAR, value)
    with caplog.at_level(logging.WARNING, logger=mk_vllm.logger.name):
        assert mk_vllm.register() is False
    assert any("is not '1'" in r.getMessage() for r in caplog.records)


@pytest.mark.skipif(HAS_VLLM, reason="checks the message when vLLM is absent")
def test_vllm_switch_on_without_vllm_logs_and_never_raises(monkeypatch, caplog):
    monkeypatch.setenv(mk_vllm.ENV_VAR, "1")
    with caplog.at_level(logging.WARNING, logger=mk_vllm.logger.name):
        assert mk_vllm.register() is False
    assert any("vLLM keeps its own" in r.getMessage() for r in caplog.records)


def _fake_base(forward_params=("query", "key", "value", "cu_seqlens", "max_seqlen", "sequence_lengths"),
               max_seqlen_is_classmethod=True, init_extra_required=False):
    """A stand-in for vLLM's MMEncoderAttention with the given signatures."""
    ns: dict = {}
    fwd_args = ", ".join(f"{p}=None" if i >= 3 else p for i, p in enumerate(forward_params))
    init_args = ("dtype_policy, " if init_extra_required else "") + (
        "num_heads, head_size, scale=None, num_kv_heads=None, prefix=''")
    exec(textwrap.dedent(f"""
        class MMEncoderAttention:
            def __init__(self, {init_args}): pass
            def forward_cuda(self, {fwd_args}): pass
            def forward_native(self, query, key, value, cu_seqlens=None, max_seqlen=None, sequence_lengths=None): pass
            def forward_cpu(self, query, key, value, cu_seqlens=None, max_seqlen=None, sequence_lengths=None): pass
            {"@classmethod" if max_seqlen_is_classmethod else "@staticmethod"}
            def compute_max_seqlen({"cls, " if max_seqlen_is_classmethod else ""}attn_backend, cu_seqlens): pass
            @classmethod
            def maybe_compute_seq_lens(cls, attn_backend, cu_seqlens, device): pass
            @classmethod
            def maybe_recompute_cu_seqlens(cls, attn_backend, cu_seqlens, hidden_size, tp_size, device,
                                           fp8_padded_hidden_size=None): pass
            @classmethod
            def register_oot(cls, op_cls=None, name=None): pass
            @classmethod
            def enabled(cls): return True
    """), ns)
    return ns["MMEncoderAttention"]


def test_vllm_signature_check_on_fake_classes():
    assert mk_vllm.signature_problems(_fake_base()) == []
    problems = mk_vllm.signature_problems(_fake_base(forward_params=("query", "key", "value", "cu_seqlens",
                                                                      "max_seqlen")))
    assert len(problems) == 1 and "forward_cuda" in problems[0] and "sequence_lengths" in problems[0]
    problems = mk_vllm.signature_problems(_fake_base(max_seqlen_is_classmethod=False))
    assert any("compute_max_seqlen is not a classmethod" in p for p in problems)
    problems = mk_vllm.signature_problems(_fake_base(init_extra_required=True))
    assert any("__init__" in p and "dtype_policy" in p for p in problems)


def test_sglang_cli_choices_extended():
    parser = argparse.ArgumentParser()
    parser.add_argument("--mm-attention-backend", choices=["sdpa", "fa3"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--mm-attention-backend", "mmkernels"])
    assert mk_sglang.extend_cli_choices(parser) and mk_sglang.extend_cli_choices(parser)
    assert parser.parse_args(["--mm-attention-backend", "mmkernels"]).mm_attention_backend == "mmkernels"
    assert list(parser._actions[-1].choices) == ["sdpa", "fa3", "mmkernels"]
    assert not mk_sglang.extend_cli_choices(argparse.ArgumentParser())


def _packed_qkv(total, h, hkv, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(total, h, d, generator=g), torch.randn(total, hkv, d, generator=g),
            torch.randn(total, hkv, d, generator=g))


@pytest.mark.parametrize("hkv", [4, 2], ids=["mha", "gqa"])
def test_sglang_backend_call_forms(hkv):
    """Every cu_seqlens form SGLang passes, GQA, output_ws: against float64 per sequence."""
    cls = mk_sglang.build_backend_class()
    h, d = 4, 24
    cu = torch.tensor([0, 7, 7, 20, 29], dtype=torch.int32)  # an empty image, odd lengths
    total = int(cu[-1])
    q, k, v = _packed_qkv(total, h, hkv, d)
    layer = cls(head_dim=d, num_heads=h, num_kv_heads=hkv, dropout=0.0, flatten_batch=True,
                softmax_in_single_precision=False, softmax_scale=None, use_data_parallel=False, workspace_buffer=None)
    ref = _reference(q, k, v, cu, 1 / math.sqrt(d))
    lens = cu[1:] - cu[:-1]
    forms = {
        "tensor": dict(cu_seqlens=cu),
        "int64 tensor": dict(cu_seqlens=cu.long()),
        "graph list": dict(cu_seqlens=[cu, lens, 13]),
        "fa list": dict(cu_seqlens=[cu, 13]),
        "forward_metadata": dict(cu_seqlens=None, forward_metadata=SimpleNamespace(cu_seqlens=cu, seq_lens=lens,
                                                                                   max_seqlen=13)),
        "max_seqlen kw": dict(cu_seqlens=cu, max_seqlen=13, sequence_lengths=lens),
    }
    if hkv == h:  # the forms are the GQA case's; MHA: one form
        forms = {"tensor": forms["tensor"]}
    for name, kw in forms.items():
        out = layer(q, k, v, bsz=1, seq_len=total, softmax_scale=None, window_size=(-1, -1), s_aux=None,
                    attention_mask=None, output_ws=None, **kw)
        assert out.shape == (total, h, d), name
        assert _worst(out, ref) < 2e-5, (name, _worst(out, ref))
    ws = torch.full((total, h, d), float("nan"))
    out = layer(q, k, v, cu_seqlens=cu, bsz=1, seq_len=total, output_ws=ws, window_size=(-1, -1))
    assert out is ws and _worst(ws, ref) < 2e-5
    scale = 0.3
    out = layer(q, k, v, cu_seqlens=cu, bsz=1, seq_len=total, softmax_scale=scale)
    assert _worst(out, _reference(q, k, v, cu, scale)) < 2e-5


def test_sglang_backend_batches_without_cu_seqlens_and_with_a_mask():
    cls = mk_sglang.build_backend_class()
    bsz, s, h, d = 2, 9, 4, 16
    q, k, v = _packed_qkv(bsz * s, h, h, d, seed=1)
    layer = cls(head_dim=d, num_heads=h, num_kv_heads=h)
    cu = torch.arange(0, (bsz + 1) * s, s, dtype=torch.int32)
    ref = _reference(q, k, v, cu, 1 / math.sqrt(d))
    assert _worst(layer(q, k, v, cu_seqlens=None, bsz=bsz, seq_len=s), ref) < 2e-5
    # SGLang's sdpa backend takes a (B, 1, S, S) bool mask in place of cu_seqlens: so does this one
    mask = torch.ones(bsz, 1, s, s, dtype=torch.bool)
    mask[1, :, :, 6:] = False
    out = layer(q, k, v, cu_seqlens=None, bsz=bsz, seq_len=s, attention_mask=mask)
    qd, kd, vd = (t.double().view(bsz, s, h, d).transpose(1, 2) for t in (q, k, v))
    want = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask).transpose(1, 2).reshape(bsz * s, h, d)
    assert _worst(out, want) < 2e-5


def test_sglang_backend_padded_metadata_is_bit_identical():
    """The capture contract as the adapters use it: trailing empty sequences and rows past
    cu_seqlens[-1] leave the real rows' result unchanged, bit for bit."""
    cls = mk_sglang.build_backend_class()
    h, d = 4, 16
    cu = torch.tensor([0, 5, 17, 26], dtype=torch.int32)
    q, k, v = _packed_qkv(32, h, h, d, seed=2)  # 6 unused tail rows
    layer = cls(head_dim=d, num_heads=h, num_kv_heads=h)
    plain = layer(q[:26], k[:26], v[:26], cu_seqlens=cu, bsz=1, seq_len=26)
    padded_cu = torch.cat([cu, cu[-1:].repeat(5)])  # as vLLM/SGLang graph buffers pad it
    padded = layer(q, k, v, cu_seqlens=padded_cu, bsz=1, seq_len=32)
    assert torch.equal(padded[:26], plain)
    assert not padded[26:].any()  # the tail rows: 0
    ws = torch.full((32, h, d), float("nan"))  # SGLang's graph mode: the kernel writes output_ws itself
    with torch.no_grad():
        assert layer(q, k, v, cu_seqlens=padded_cu, bsz=1, seq_len=32, output_ws=ws) is ws
    assert torch.equal(ws, padded)


def test_sglang_backend_refuses_sliding_windows_and_sinks():
    cls = mk_sglang.build_backend_class()
    q, k, v = _packed_qkv(10, 2, 2, 8)
    cu = torch.tensor([0, 10], dtype=torch.int32)
    layer = cls(head_dim=8, num_heads=2, num_kv_heads=2)
    layer(q, k, v, cu_seqlens=cu, bsz=1, seq_len=10, window_size=(-1, -1))  # full attention: fine
    with pytest.raises(NotImplementedError, match="window_size=\\(4, 4\\).*fa3"):
        layer(q, k, v, cu_seqlens=cu, bsz=1, seq_len=10, window_size=(4, 4))
    with pytest.raises(NotImplementedError, match="sinks"):
        layer(q, k, v, cu_seqlens=cu, bsz=1, seq_len=10, s_aux=torch.zeros(2))


# --------------------------------------------------------------------------------------------
# vLLM (real engine, CPU)
# --------------------------------------------------------------------------------------------
def _weights_loaded(model):
    """What vLLM's loader does after loading: the CPU linear layers pick their GEMM here."""
    for m in model.modules():
        qm = getattr(m, "quant_method", None)
        if qm is not None and hasattr(qm, "process_weights_after_loading"):
            qm.process_weights_after_loading(m)
    return model


@pytest.fixture(scope="module")
def vllm_world(tmp_path_factory):
    if not HAS_VLLM:
        pytest.skip(f"vLLM is not installed in this Python; {_HOW}")
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    os.environ["VLLM_DISABLE_COMPILE_CACHE"] = "1"
    os.environ["VLLM_CACHE_ROOT"] = str(tmp_path_factory.mktemp("vllm-cache"))
    import vllm  # noqa: F401
    from vllm.config import CompilationConfig, VllmConfig, set_current_vllm_config
    from vllm.config.compilation import CompilationMode
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.distributed.parallel_state import model_parallel_is_initialized

    # custom_ops "none": vLLM's other CustomOps (QuickGELU, ...) run their forward_native, since
    # this venv has vLLM's CUDA build (no CPU vllm._C); MMEncoderAttention is always enabled
    cfg = VllmConfig(compilation_config=CompilationConfig(mode=CompilationMode.NONE, custom_ops=["none"]))
    try:
        torch.ops._C.gelu_quick
    except (AttributeError, RuntimeError):
        # QuickGELU (Qwen2-VL) looks this op up in __init__ on every platform; on x86 CPUs its
        # forward is forward_native, so a definition without a kernel is enough here
        torch.library.define("_C::gelu_quick", "(Tensor(a!) out, Tensor input) -> ()")
    if not model_parallel_is_initialized():
        store = tmp_path_factory.mktemp("dist") / "store"
        with set_current_vllm_config(cfg):  # a world of one gloo process on a file store
            init_distributed_environment(world_size=1, rank=0, distributed_init_method=f"file://{store}",
                                         local_rank=0, backend="gloo")
            initialize_model_parallel(1, 1)
    return SimpleNamespace(cfg=cfg, set_config=set_current_vllm_config)


@contextlib.contextmanager
def _vllm_plugin(monkeypatch):
    """mmkernels registered as vLLM's MMEncoderAttention inside the block (as the entry point
    does), vLLM's own class again after it."""
    from vllm.model_executor.custom_op import op_registry_oot

    monkeypatch.setenv(mk_vllm.ENV_VAR, "1")
    assert mk_vllm.register() is True
    try:
        yield op_registry_oot["MMEncoderAttention"]
    finally:
        op_registry_oot.pop("MMEncoderAttention", None)
        monkeypatch.delenv(mk_vllm.ENV_VAR)


@needs_vllm
def test_vllm_entry_point_in_a_fresh_process():
    res = _run("""
        import logging, os, sys
        logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(name)s %(levelname)s %(message)s")
        from importlib.metadata import entry_points
        eps = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
        assert eps.get("mmkernels") == "mmkernels.integrations.vllm:register", eps
        import vllm.plugins as plugins
        from vllm.config import VllmConfig, set_current_vllm_config
        from vllm.model_executor.custom_op import op_registry_oot
        from vllm.model_executor.layers.attention.mm_encoder_attention import MMEncoderAttention
        os.environ.pop("MMKERNELS_VLLM", None)
        plugins.load_general_plugins()
        with set_current_vllm_config(VllmConfig()):
            print("OFF", type(MMEncoderAttention(4, 16)).__name__)
        plugins.plugins_loaded = False
        os.environ["MMKERNELS_VLLM"] = "1"
        plugins.load_general_plugins()
        with set_current_vllm_config(VllmConfig()):
            layer = MMEncoderAttention(4, 16, num_kv_heads=2)
        print("ON", type(layer).__name__, layer._mk_active)
    """, {"VLLM_TARGET_DEVICE": "cpu"})
    out = res.stdout
    assert res.returncode == 0, res.stderr[-3000:] + out[-2000:]
    assert "OFF MMEncoderAttention" in out
    assert "ON MMKernelsEncoderAttention True" in out
    import vllm

    line = [ln for ln in out.splitlines() if "runs on mmkernels.attention_varlen (MMKERNELS_VLLM=1" in ln]
    assert line and f"vLLM {vllm.__version__}'s vision-encoder attention" in line[0], out[-3000:]
    assert "checked against vLLM 0.33.0" in line[0] or "signatures match" in line[0]
    assert any("MMEncoderAttention layers run on mmkernels.attention_varlen, not" in ln for ln in out.splitlines())


@needs_vllm
def test_vllm_signature_mismatch_keeps_vllm_backend(vllm_world, monkeypatch, caplog):
    from vllm.model_executor.custom_op import op_registry_oot
    from vllm.model_executor.layers.attention.mm_encoder_attention import MMEncoderAttention

    def forward_cuda(self, query, key, value, cu_seqlens=None, max_seqlen=None, sequence_lengths=None,
                     attn_metadata=None):  # a future vLLM with one more argument
        raise AssertionError("not called")

    monkeypatch.setattr(MMEncoderAttention, "forward_cuda", forward_cuda)
    monkeypatch.setenv(mk_vllm.ENV_VAR, "1")
    with caplog.at_level(logging.WARNING, logger=mk_vllm.logger.name):
        assert mk_vllm.register() is False
    assert "MMEncoderAttention" not in op_registry_oot
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "differs from the contract" in msg and "attn_metadata" in msg and "vLLM keeps its own" in msg
    with vllm_world.set_config(vllm_world.cfg):
        assert type(MMEncoderAttention(4, 16)) is MMEncoderAttention


@needs_vllm
def test_vllm_layer_shapes_gqa_and_padding(vllm_world, monkeypatch, launches):
    from vllm.model_executor.layers.attention.mm_encoder_attention import MMEncoderAttention

    h, hkv, d = 4, 2, 24
    with vllm_world.set_config(vllm_world.cfg):
        own = MMEncoderAttention(h, d, scale=0.2, num_kv_heads=hkv)
        with _vllm_plugin(monkeypatch) as cls:
            ours = MMEncoderAttention(h, d, scale=0.2, num_kv_heads=hkv)
    assert type(ours) is cls and type(own) is MMEncoderAttention
    q, k, v = _packed_qkv(29, h, hkv, d, seed=3)
    cu = torch.tensor([0, 7, 7, 20, 29], dtype=torch.int32)
    ref = _reference(q, k, v, cu, 0.2)
    # (B, S, H·D) with cu_seqlens (how Qwen-VL towers call it) and (B, S, H, D)
    out3 = ours(q.reshape(1, 29, -1), k.reshape(1, 29, -1), v.reshape(1, 29, -1), cu_seqlens=cu,
                max_seqlen=torch.tensor(13), sequence_lengths=None)
    assert out3.shape == (1, 29, h * d) and _worst(out3.view(29, h, d), ref) < 2e-5
    out4 = ours(q[None], k[None], v[None], cu_seqlens=cu)
    assert out4.shape == (1, 29, h, d) and out4.is_contiguous() and torch.equal(out4.view(29, h, d),
                                                                                out3.view(29, h, d))
    assert _worst(own(q[None], k[None], v[None], cu_seqlens=cu, max_seqlen=torch.tensor(13))[0], ref) < 2e-5
    assert launches.count == 2
    # no cu_seqlens: batch rows are the sequences, query and key lengths may differ
    qb, kb, vb = torch.randn(2, 5, h, d), torch.randn(2, 8, hkv, d), torch.randn(2, 8, hkv, d)
    assert _worst(ours(qb, kb, vb), own(qb, kb, vb)) < 2e-5
    # padded metadata: trailing empty sequences + 6 rows past cu_seqlens[-1] (a token budget)
    qp, kp, vp = _packed_qkv(35, h, hkv, d, seed=4)
    qp[:29], kp[:29], vp[:29] = q, k, v
    padded = ours(qp[None], kp[None], vp[None], cu_seqlens=torch.cat([cu, cu[-1:].repeat(4)]))
    assert torch.equal(padded[0, :29], out4[0])


@needs_vllm
def test_vllm_metadata_classmethods(vllm_world, monkeypatch):
    import numpy as np
    from vllm.model_executor.layers.attention.mm_encoder_attention import MMEncoderAttention
    from vllm.v1.attention.backends.registry import AttentionBackendEnum as B

    cu = np.array([0, 16, 16, 80], dtype=np.int32)
    with _vllm_plugin(monkeypatch):
        for backend in (B.FLASH_ATTN, B.TRITON_ATTN, B.TORCH_SDPA):
            assert MMEncoderAttention.maybe_compute_seq_lens(backend, cu, torch.device("cpu")) is None
            t = MMEncoderAttention.maybe_recompute_cu_seqlens(backend, cu, 64, 1, torch.device("cpu"))
            assert t.tolist() == cu.tolist()
        # FlashInfer (chosen explicitly) keeps vLLM's own metadata and layer
        assert MMEncoderAttention.maybe_compute_seq_lens(B.FLASHINFER, cu, torch.device("cpu")) is not None
        assert len(MMEncoderAttention.maybe_recompute_cu_seqlens(B.FLASHINFER, cu, 64, 1, torch.device("cpu"))) > 4


def _tower_config(name: str):
    """(config, grids) of the tiny vision tower both engines' tests build (transformers' config
    classes; the same towers in vLLM and SGLang)."""
    if name == "qwen2_5_vl":
        from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig

        cfg = Qwen2_5_VLVisionConfig(depth=4, hidden_size=96, intermediate_size=128, num_heads=4, out_hidden_size=48,
                                     patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                                     fullatt_block_indexes=[1, 3], in_channels=3)
        return cfg, [[1, 8, 12], [1, 4, 4], [2, 4, 8]]
    if name == "qwen2_vl":
        from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig

        # SGLang 0.5.23 reads the pre-5.x name in_chans
        cfg = Qwen2VLVisionConfig(depth=2, embed_dim=80, mlp_ratio=2, num_heads=4, hidden_size=48, patch_size=14,
                                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3, in_chans=3)
        return cfg, [[1, 6, 8], [1, 4, 4]]
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig

    cfg = Qwen3VLVisionConfig(depth=3, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=48,
                              patch_size=16, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                              num_position_embeddings=64, deepstack_visual_indexes=[1])
    return cfg, [[1, 6, 8], [1, 4, 4]]


def _vllm_tower(name: str):
    """(constructor, config, grids) of a tiny vision tower of vLLM's own model code."""
    if name == "qwen2_5_vl":
        from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VisionTransformer as tower
    elif name == "qwen2_vl":
        from vllm.model_executor.models.qwen2_vl import Qwen2VisionTransformer as tower
    else:
        from vllm.model_executor.models.qwen3_vl import Qwen3_VisionTransformer as tower
    return (tower, *_tower_config(name))


def _random_weights(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


@needs_vllm
@pytest.mark.parametrize("model", ["qwen2_5_vl", "qwen2_vl", "qwen3_vl"])
def test_vllm_vision_tower_equal(vllm_world, monkeypatch, launches, model):
    """The engine's own tower, random weights: mmkernels vs vLLM's own attention (its CPU
    route: one SDPA per image after .tolist()), both against the tower run in float64."""
    ctor, cfg, grid = _vllm_tower(model)
    with vllm_world.set_config(vllm_world.cfg):
        own = _weights_loaded(_random_weights(ctor(cfg, prefix="visual").eval()))
        with _vllm_plugin(monkeypatch):
            ours = _weights_loaded(ctor(cfg, prefix="visual").eval())
        ref = ctor(cfg, prefix="visual").eval()
    ours.load_state_dict(own.state_dict())
    ref.load_state_dict(own.state_dict())
    ref = _weights_loaded(ref.double())
    attn = [m for m in ours.modules() if type(m).__name__ == "MMKernelsEncoderAttention"]
    assert len(attn) == cfg.depth
    n = sum(t * h * w for t, h, w in grid)
    x = torch.randn(n, ours.patch_embed.proj.weight[0].numel(), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(x.double(), grid)
        got_own = own(x, grid)
        launches.count = 0
        got = ours(x, grid)
    assert launches.count == cfg.depth  # one packed Triton launch per layer
    err, err_own = _worst(got, want), _worst(got_own, want)
    _figure(f"vLLM {model}: max |ours - fp64| {err:.2e}, |vLLM own - fp64| {err_own:.2e}, "
          f"|ours - own| {_worst(got, got_own):.2e}, {launches.count} launches / {cfg.depth} layers")
    assert err <= 2 * err_own + 1e-6, (err, err_own)
    if model == "qwen2_5_vl":
        # the windows are real: the same layers over full images give another result
        meta = ours.prepare_encoder_metadata(grid)
        full = dict(meta, cu_window_seqlens=meta["cu_seqlens"], max_seqlen_window=meta["max_seqlen_full"])
        with torch.no_grad():
            windows = _worst(ours(x, grid, encoder_metadata=full), got)
            _figure(f"vLLM qwen2_5_vl: windows vs all-full layers differ by {windows:.2e}")
            assert windows > 100 * max(err, 1e-7)
            # CUDA-graph style metadata: cu_seqlens padded to a batch of 8 images, windows to 64
            padded = ours.prepare_encoder_metadata(grid, max_batch_size=8, max_window_seqs_per_batch=64)
            assert padded["cu_seqlens"].shape[0] == 9 and padded["cu_window_seqlens"].shape[0] == 65
            assert torch.equal(ours(x, grid, encoder_metadata=padded), got)


@needs_vllm
def test_vllm_compiled_vision_blocks_have_no_graph_break(vllm_world, monkeypatch, launches):
    """vLLM's own compile path for the encoder (compile_mm_encoder: @support_torch_compile on
    Qwen2_5_VisionBlock, torch.compile(fullgraph=True)), eager backend to skip Inductor's C++
    build: it would raise on a graph break."""
    import torch._dynamo.utils as dynamo_utils
    from vllm.config import CompilationConfig, VllmConfig
    from vllm.config.compilation import CompilationMode

    ctor, cfg, grid = _vllm_tower("qwen2_5_vl")
    compiled = VllmConfig(compilation_config=CompilationConfig(mode=CompilationMode.VLLM_COMPILE,
                                                               compile_mm_encoder=True, backend="eager",
                                                               custom_ops=["none"]))
    with vllm_world.set_config(vllm_world.cfg):
        eager = _weights_loaded(_random_weights(ctor(cfg, prefix="visual").eval()))
    with vllm_world.set_config(compiled):
        with _vllm_plugin(monkeypatch):
            tower = ctor(cfg, prefix="visual").eval()
        tower.load_state_dict(eager.state_dict())
        _weights_loaded(tower)
        n = sum(t * h * w for t, h, w in grid)
        x = torch.randn(n, tower.patch_embed.proj.weight[0].numel(), generator=torch.Generator().manual_seed(1))
        dynamo_utils.counters.clear()
        with torch.no_grad():
            got = tower(x, grid)
            launches.count = 0
            again = tower(x, grid)
    _figure(f"vLLM qwen2_5_vl compiled (compile_mm_encoder, fullgraph): "
            f"{sum(dynamo_utils.counters['graph_break'].values())} graph breaks, "
            f"{dynamo_utils.counters['stats']['unique_graphs']} graphs, {launches.count} launches / {cfg.depth} layers")
    assert not dynamo_utils.counters["graph_break"], dict(dynamo_utils.counters["graph_break"])
    assert dynamo_utils.counters["stats"]["unique_graphs"] >= 1
    assert launches.count == cfg.depth
    with torch.no_grad():
        want = eager(x, grid)
    assert torch.equal(got, again) and _worst(got, want) < 1e-4


# --------------------------------------------------------------------------------------------
# SGLang (real engine, CPU)
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sglang_world():
    if not HAS_SGLANG:
        pytest.skip(f"SGLang is not installed in this Python; {_HOW}")
    from sglang.srt.layers.dp_attention import initialize_dp_attention_flags
    from sglang.srt.plugins.hook_registry import HookRegistry
    from sglang.srt.runtime_context import get_parallel
    from sglang.srt.server_args import ServerArgs
    from sglang.test import parallel_groups

    assert mk_sglang.register() is True  # what load_plugins() does with the entry point
    HookRegistry.apply_hooks()

    def publish(backend: str):
        """Publish a CPU server config whose --mm-attention-backend is ``backend``."""
        args = ServerArgs(model_path="dummy", device="cpu", mm_attention_backend=backend)
        parallel_groups.publish(args, role="test")
        initialize_dp_attention_flags(args)
        # a one-stage pipeline (Qwen3-VL's tower reads it)
        get_parallel().override_permanently(pp_group=SimpleNamespace(is_first_rank=True, is_last_rank=True,
                                                                      world_size=1, rank_in_group=0))

    return SimpleNamespace(publish=publish)


@needs_sglang
@pytest.mark.parametrize("allow", [None, "other_plugin"], ids=["default", "allow-list-without-mmkernels"])
def test_sglang_entry_point_in_a_fresh_process(allow):
    res = _run("""
        import argparse
        from importlib.metadata import entry_points
        eps = {ep.name: ep.value for ep in entry_points(group="sglang.srt.plugins")}
        assert eps.get("mmkernels") == "mmkernels.integrations.sglang:register", eps
        from sglang.srt.plugins import load_plugins
        load_plugins()
        from sglang.srt.layers.attention.vision import QKV_BACKEND_IMPL
        from sglang.srt.server_args import ServerArgs
        impl = QKV_BACKEND_IMPL.get("mmkernels")
        print("IMPL", impl.__name__ if impl else None)
        parser = argparse.ArgumentParser()
        ServerArgs.add_cli_args(parser)
        try:
            ns = parser.parse_args(["--model-path", "x", "--mm-attention-backend", "mmkernels"])
            print("CLI", ns.mm_attention_backend)
        except SystemExit:
            print("CLI rejected")
    """, {"SGLANG_PLUGINS": allow} if allow else {})
    assert res.returncode == 0, res.stderr[-3000:]
    if allow is None:
        assert "IMPL MMKernelsVisionAttention" in res.stdout and "CLI mmkernels" in res.stdout, res.stdout
    else:
        assert "IMPL None" in res.stdout and "CLI rejected" in res.stdout, res.stdout


def _sglang_tower(name: str):
    """(constructor, config, grids) of the same tiny tower in SGLang's own model code."""
    if name == "qwen2_5_vl":
        from sglang.srt.models.qwen2_5_vl import Qwen2_5_VisionTransformer as tower
    elif name == "qwen2_vl":
        from sglang.srt.models.qwen2_vl import Qwen2VisionTransformer as tower
    else:
        from sglang.srt.models.qwen3_vl import Qwen3VLMoeVisionModel as tower
    return (tower, *_tower_config(name))


@needs_sglang
@pytest.mark.parametrize("model", ["qwen2_5_vl", "qwen2_vl", "qwen3_vl"])
def test_sglang_vision_tower_equal(sglang_world, launches, monkeypatch, model):
    """SGLang's own tower, random weights: --mm-attention-backend mmkernels vs sdpa (the CPU
    default here), both against the tower run in float64."""
    ctor, cfg, grid = _sglang_tower(model)
    if model == "qwen3_vl":
        # its RotaryEmbedding picks a fallback kernel in __init__ (vllm._custom_ops) unless SGLang
        # runs its CPU engine (SGLANG_USE_CPU_ENGINE=1, which needs sgl_kernel's CPU build): take
        # the CPU engine's branch, the plain PyTorch one, for this tower
        import sglang.srt.layers.rotary_embedding.base as rope_base

        monkeypatch.setattr(rope_base, "_is_cpu", True)
    sglang_world.publish("sdpa")
    own = _random_weights(ctor(cfg, prefix="visual").eval())
    ref = ctor(cfg, prefix="visual").eval()
    sglang_world.publish("mmkernels")
    ours = ctor(cfg, prefix="visual").eval()
    ours.load_state_dict(own.state_dict())
    ref.load_state_dict(own.state_dict())
    ref = ref.double()
    names = {type(m.qkv_backend).__name__ for m in ours.modules() if hasattr(m, "qkv_backend")}
    assert names == {"MMKernelsVisionAttention"}
    grid_t = torch.tensor(grid)
    n = int(grid_t.prod(-1).sum())
    x = torch.randn(n, cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2,
                    generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(x.double(), grid_t)
        got_own = own(x, grid_t)
        launches.count = 0
        got = ours(x, grid_t)
    assert launches.count == cfg.depth
    err, err_own = _worst(got, want), _worst(got_own, want)
    _figure(f"SGLang {model}: max |ours - fp64| {err:.2e}, |sdpa - fp64| {err_own:.2e}, "
          f"|ours - sdpa| {_worst(got, got_own):.2e}, {launches.count} launches / {cfg.depth} layers")
    assert err <= 2 * err_own + 1e-6, (err, err_own)
    if model == "qwen2_5_vl":  # the windows are real: all-full layers give another result
        ours.fullatt_block_indexes = list(range(cfg.depth))
        with torch.no_grad():
            windows = _worst(ours(x, grid_t), got)
        _figure(f"SGLang qwen2_5_vl: windows vs all-full layers differ by {windows:.2e}")
        assert windows > 100 * max(err, 1e-7)


@needs_sglang
def test_sglang_layer_output_ws_list_form_and_sink_refusal(sglang_world):
    from sglang.srt.layers.attention.vision import VisionAttention

    sglang_world.publish("sdpa")
    torch.manual_seed(0)
    # (MHA: SGLang's sdpa backend has no GQA; GQA is checked against float64 above)
    own = VisionAttention(embed_dim=64, num_heads=4, projection_size=64, use_qkv_parallel=True, flatten_batch=True)
    _random_weights(own)
    sglang_world.publish("mmkernels")
    ours = VisionAttention(embed_dim=64, num_heads=4, projection_size=64, use_qkv_parallel=True, flatten_batch=True)
    ours.load_state_dict(own.state_dict())
    assert ours.qkv_backend_name == "mmkernels"
    x = torch.randn(1, 30, 64)
    cu = torch.tensor([0, 12, 30], dtype=torch.int32)
    with torch.no_grad():
        want = own(x, cu_seqlens=cu)
        ws = torch.full((30, 4, 16), float("nan"))
        got = ours(x, cu_seqlens=[cu, cu[1:] - cu[:-1], 18], output_ws=ws)  # the ViT CUDA-graph call form
    assert torch.isfinite(ws).all() and _worst(got, want) < 1e-5
    # MiMo-VL's windowed blocks (sinks + sliding window) are refused when the model is built
    with pytest.raises(ValueError, match="sinks.*sliding window \\(8, 8\\).*fa3"):
        VisionAttention(embed_dim=64, num_heads=4, projection_size=64, use_qkv_parallel=True, use_sink=True,
                        window_size=(8, 8))
    # a window without sinks is never applied by SGLang (full_attn layers): accepted
    VisionAttention(embed_dim=64, num_heads=4, projection_size=64, use_qkv_parallel=True, window_size=(8, 8))


@needs_sglang
def test_sglang_vit_cuda_graph_runner_hands_triton_form(sglang_world):
    """The runner picks its call form by backend name; with the hook, mmkernels gets the
    triton_attn form (the capture itself needs a GPU: tests/test_engine_plugins.py GPU case)."""
    mod = pytest.importorskip("sglang.srt.multimodal.vit_cuda_graph_runner")
    runner = mod.ViTCudaGraphRunner.__new__(mod.ViTCudaGraphRunner)
    runner._attn_backend = "mmkernels"
    mk_sglang._graph_runner_hook(None, runner)
    assert runner._attn_backend == "triton_attn"
    from sglang.srt.plugins.hook_registry import HookRegistry

    assert any(t.endswith("ViTCudaGraphRunner.__init__") for t in HookRegistry._patched)


@pytest.mark.gpu
def test_sglang_backend_cuda_graph_capture_and_replay():
    """CUDA-graph contract through the adapter: capture once with a padded layout, replay
    with other lengths written into the same cu_seqlens buffer: output_ws gets each layout's
    result, equal to an eager call (needs a GPU)."""
    cls = mk_sglang.build_backend_class()
    h, d, total = 4, 80, 256
    layer = cls(head_dim=d, num_heads=h, num_kv_heads=h)
    q, k, v = (t.cuda().half() for t in _packed_qkv(total, h, h, d, seed=5))
    cu_buf = torch.tensor([0, 100, 256, 256, 256], dtype=torch.int32, device="cuda")
    ws = torch.empty(total, h, d, dtype=torch.half, device="cuda")
    layer(q, k, v, cu_seqlens=[cu_buf, 156], bsz=1, seq_len=total, output_ws=ws)  # warm-up (autotune)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        layer(q, k, v, cu_seqlens=[cu_buf, 156], bsz=1, seq_len=total, output_ws=ws)
    for layout in ([0, 100, 256, 256, 256], [0, 64, 128, 192, 256], [0, 7, 200, 201, 256]):
        cu_buf.copy_(torch.tensor(layout, dtype=torch.int32))
        graph.replay()
        torch.cuda.synchronize()
        eager = layer(q, k, v, cu_seqlens=cu_buf.clone(), bsz=1, seq_len=total)
        assert torch.equal(ws, eager), layout

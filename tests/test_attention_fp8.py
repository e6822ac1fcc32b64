"""FP8 (e4m3) attention forward (issue 22 item 2): ``mk.attention(..., fp8=...)`` and
``mk.attention_varlen(..., fp8=...)``, dense and packed, in the Triton interpreter on CPU (the
same tests run compiled on a CUDA device of sm_89+).

Accuracy is gated against float64 with limits set from measurement (docs/fp8.md has the table):
the e4m3 rounding of Q, K (3 mantissa bits) dominates, so the gates are fp8's, not bf16's; every
case also checks the fp8 error stays within a small factor of an exact torch emulation of the same
quantisation (``fp8_helpers.quantize``), so a kernel bug cannot hide under a loose gate.  The
interpreter's own fp32 -> e4m3 cast is wrong (no carry, ties up, no subnormals): the GPU's
round-to-nearest-even is installed for these tests (``_interpreter_fp8``).
"""

from __future__ import annotations

import warnings

import _interpreter_fp8
import pytest
import torch
from conftest import DEVICE, HAS_CUDA
from fp8_helpers import errors, inputs, quantize, sage_emulation, sdpa64

import mmkernels as mk

FP8_CAST = _interpreter_fp8.install()
E4M3 = torch.float8_e4m3fn

needs_fp8_device = pytest.mark.skipif(
    HAS_CUDA and torch.cuda.get_device_capability() < (8, 9), reason="e4m3 tensor cores need sm_89+")

# Gates from measurement (interpreter, patched casts; B=1, H=2, L=113 unless noted; docs/fp8.md):
# random N(0,1) inputs: max err 0.03-0.11 (the short causal rows copy V's rounding), cos >= 0.9985;
# outlier channels ×20: max err <= 1.6, cos >= 0.988 (vs int8-QK/fp8-PV emulation 0.28, 0.9994).
GATE = {"random": (0.2, 0.997), "outlier": (2.5, 0.98)}


def _dense(b, h, hkv, lq, lk, d, dtype=torch.bfloat16, kind="random", seed=0):
    q, k, v = inputs(kind, (b, h, lq, d), (b, hkv, lk, d), dtype=dtype, seed=seed)
    return q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)


def _check(out, ref, kind="random", emu=None):
    assert torch.isfinite(out).all()
    err, cos = errors(out, ref)
    lim_err, lim_cos = GATE[kind]
    assert err <= lim_err and cos >= lim_cos, (err, cos)
    if emu is not None:  # the kernel is as accurate as an exact emulation of its quantisation
        e_err, e_cos = errors(emu, ref)
        assert err <= 1.5 * e_err + 0.02 and (1 - cos) <= 1.5 * (1 - e_cos) + 1e-4, (err, cos, e_err, e_cos)
    return err, cos


def _emulated(q, k, v, is_causal=False, dims=(-2, -1)):
    """The result of exact e4m3 Q, K, V (as the pre-pass rounds them) in float64 attention."""
    (q8, qd), (k8, kd), (v8, vd) = (quantize(x, dims) for x in (q, k, v))
    deq = [x8.double() * xd.double()[..., None, None] for x8, xd in ((q8, qd), (k8, kd), (v8, vd))]
    return sdpa64(*deq, is_causal)


# --------------------------------------------------------------------------------------
# dense
# --------------------------------------------------------------------------------------
@needs_fp8_device
@pytest.mark.parametrize("d,lq,lk,causal", [
    (64, 113, 113, False), (72, 17, 113, True), (80, 113, 113, True), (88, 113, 17, False), (128, 1, 113, False),
    (72, 113, 113, False), (128, 113, 113, True),
])
def test_dense_dynamic(d, lq, lk, causal):
    q, k, v = _dense(1, 2, 2, lq, lk, d)
    with torch.no_grad():
        out = mk.attention(q, k, v, is_causal=causal, fp8="dynamic")
    assert out.dtype == torch.bfloat16 and out.shape == (1, 2, lq, d)
    _check(out.cpu(), sdpa64(q.cpu(), k.cpu(), v.cpu(), causal), emu=_emulated(q.cpu(), k.cpu(), v.cpu(), causal))


@needs_fp8_device
@pytest.mark.parametrize("per_head", [True, False])
def test_dense_explicit_descales_gqa_mask(per_head):
    """float8 inputs with descales, GQA 4:2, a (B, 1, 1, Lk) padding mask; per-head descales equal
    to the dynamic pre-pass's give its result bit for bit."""
    b, h, hkv, lq, lk, d = 2, 4, 2, 40, 50, 72
    q, k, v = _dense(b, h, hkv, lq, lk, d)
    mask = torch.ones(b, 1, 1, lk, dtype=torch.bool, device=DEVICE)
    mask[1, ..., 37:] = False
    dims = (-2, -1) if per_head else (0, 1, 2, 3)
    (q8, qd), (k8, kd), (v8, vd) = (quantize(x, dims) for x in (q, k, v))
    if not per_head:
        qd, kd, vd = qd.reshape(()), kd.reshape(()), vd.reshape(())
    out = mk.attention(q8, k8, v8, attn_mask=mask, enable_gqa=True, fp8=dict(q_descale=qd, k_descale=kd, v_descale=vd))
    assert out.dtype == torch.bfloat16
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double().repeat_interleave(2, 1), v.double().repeat_interleave(2, 1), attn_mask=mask)
    _check(out.cpu(), ref.cpu())
    if per_head:
        dyn = mk.attention(q, k, v, attn_mask=mask, enable_gqa=True, fp8="dynamic")
        assert torch.equal(out, dyn)
    # a tuple works as the dict
    out2 = mk.attention(q8, k8, v8, attn_mask=mask, enable_gqa=True, fp8=(qd, kd, vd), out_dtype=torch.float16)
    assert out2.dtype == torch.float16
    torch.testing.assert_close(out2.float(), out.float(), atol=8e-3, rtol=8e-3)


@needs_fp8_device
def test_dense_additive_mask_and_scale():
    """A per-score additive float mask (the logits are pre-scaled: the q·k descales ride on the
    scale there too) and a non-default scale."""
    q, k, v = _dense(2, 2, 2, 40, 45, 64, dtype=torch.float16)
    g = torch.Generator().manual_seed(5)
    mask = torch.randn(2, 1, 40, 45, generator=g).to(DEVICE)
    mask[..., 30:] = float("-inf")
    out = mk.attention(q, k, v, attn_mask=mask, scale=0.2, fp8="dynamic")
    assert out.dtype == torch.float16
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                                           attn_mask=mask.double(), scale=0.2)
    _check(out.cpu(), ref.cpu())


@needs_fp8_device
@pytest.mark.parametrize("kind", ["random", "outlier"])
def test_accuracy_vs_bf16_and_int8_emulation(kind, record_property):
    """fp8 vs float64 next to bf16's error and a SageAttention2-style int8-QK / fp8-PV emulation
    (the numbers are recorded; the gates are fp8's measured ones)."""
    q, k, v = _dense(1, 2, 2, 128, 128, 72, kind=kind, seed=1)
    ref = sdpa64(q.cpu(), k.cpu(), v.cpu())
    fp8 = _check(mk.attention(q, k, v, fp8="dynamic").cpu(), ref, kind, emu=_emulated(q.cpu(), k.cpu(), v.cpu()))
    bf16 = errors(mk.attention(q, k, v).cpu(), ref)
    sage = errors(sage_emulation(q.cpu(), k.cpu(), v.cpu()), ref)
    for name, (err, cos) in (("fp8", fp8), ("bf16", bf16), ("int8qk_fp8pv", sage)):
        record_property(f"{kind}_{name}", f"max_err={err:.4f} cos={cos:.6f}")
    assert bf16[0] < fp8[0]  # bf16 stays the accurate path
    assert sage[1] > 0.998  # the emulation is sane


# --------------------------------------------------------------------------------------
# packed
# --------------------------------------------------------------------------------------
def _packed(lengths, h, hkv, d, seed=0):
    total = sum(lengths)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(total, h, d, generator=g).to(torch.bfloat16).to(DEVICE)
    k = torch.randn(total, hkv, d, generator=g).to(torch.bfloat16).to(DEVICE)
    v = torch.randn(total, hkv, d, generator=g).to(torch.bfloat16).to(DEVICE)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    return q, k, v, cu


@needs_fp8_device
@pytest.mark.parametrize("d,causal,rotary", [(64, False, True), (72, True, True), (80, True, False),
                                             (88, False, True), (128, True, True)])
def test_packed_dynamic(d, causal, rotary):
    lengths = [17, 0, 1, 60, 35]
    q, k, v, cu = _packed(lengths, 4, 2, d)
    rot = None
    if rotary:
        pos = torch.arange(q.shape[0], dtype=torch.float32)[:, None] / (1 + torch.arange(d // 2))
        rot = (pos.cos().to(DEVICE), pos.sin().to(DEVICE))
    out = mk.attention_varlen(q, k, v, cu, cu, is_causal=causal, enable_gqa=True, rotary=rot, fp8="dynamic")
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    f64 = [t.double().cpu() for t in (q, k, v)]
    rot64 = tuple(t.double().cpu() for t in rot) if rot else None
    ref = mk.attention_varlen(*f64, cu.cpu(), cu.cpu(), is_causal=causal, enable_gqa=True, rotary=rot64,
                              backend="reference")
    _check(out.cpu(), ref)


@needs_fp8_device
@pytest.mark.parametrize("per_head", [True, False])
def test_packed_explicit_descales(per_head):
    q, k, v, cu = _packed([30, 1, 50], 2, 2, 80, seed=3)
    dims = (0, 2) if per_head else (0, 1, 2)
    (q8, qd), (k8, kd), (v8, vd) = (quantize(x, dims) for x in (q, k, v))
    if not per_head:
        qd, kd, vd = qd.reshape(()), kd.reshape(()), vd.reshape(())
    out = mk.attention_varlen(q8, k8, v8, cu, cu, max_seqlen_q=50, max_seqlen_k=50,
                              fp8=dict(q_descale=qd, k_descale=kd, v_descale=vd))
    ref = mk.attention_varlen(*(t.double().cpu() for t in (q, k, v)), cu.cpu(), cu.cpu(), backend="reference")
    _check(out.cpu(), ref)
    if per_head:  # the dynamic pre-pass quantises per head over the packing: the same bits
        assert torch.equal(out, mk.attention_varlen(q, k, v, cu, cu, fp8="dynamic"))
    buf = torch.full_like(out, float("nan"))
    res = mk.attention_varlen(q8, k8, v8, cu, cu, fp8=(qd, kd, vd), out=buf)
    assert res is buf and torch.equal(buf, out)


# --------------------------------------------------------------------------------------
# contract: outputs written, validation, fallback, compile, opcheck
# --------------------------------------------------------------------------------------
@needs_fp8_device
def test_poisoned_outputs_fully_written(monkeypatch):
    monkeypatch.setenv("MMKERNELS_POISON", "1")
    q, k, v = _dense(1, 2, 2, 70, 33, 88)
    assert torch.isfinite(mk.attention(q, k, v, is_causal=True, fp8="dynamic")).all()
    q, k, v, cu = _packed([5, 0, 40, 1], 2, 1, 72)
    # rows past cu[-1] (padding) come out 0
    out = mk.attention_varlen(q, k, v, cu[:-1], cu[:-1], enable_gqa=True, fp8="dynamic")
    assert torch.isfinite(out).all() and (out[45:] == 0).all()


def test_validation_errors():
    q, k, v = (torch.randn(1, 2, 8, 64, dtype=torch.bfloat16) for _ in range(3))
    q8, k8, v8 = (t.to(E4M3) for t in (q, k, v))
    one = torch.ones(())
    with pytest.raises(ValueError, match="fp8"):
        mk.attention(q.requires_grad_(), k, v, fp8="dynamic")
    q = q.detach()
    with pytest.raises(ValueError, match="fp8"):
        mk.attention(q, k, v, fp8="static")
    with pytest.raises(ValueError, match="fp8.*dynamic"):
        mk.attention(q8, k8, v8, fp8="dynamic")
    with pytest.raises(ValueError, match="fp8.*float8_e4m3fn"):
        mk.attention(q, k, v, fp8=dict(q_descale=one, k_descale=one, v_descale=one))
    with pytest.raises(ValueError, match="fp8.*k_descale.*shape"):
        mk.attention(q8, k8, v8, fp8=dict(q_descale=one, k_descale=torch.ones(3), v_descale=one))
    with pytest.raises(ValueError, match="fp8.*q_descale.*float32"):
        mk.attention(q8, k8, v8, fp8=dict(q_descale=torch.ones((), dtype=torch.float64), k_descale=one,
                                          v_descale=one))
    with pytest.raises(ValueError, match="fp8.*unknown keys"):
        mk.attention(q8, k8, v8, fp8=dict(q_scale=one))
    with pytest.raises(ValueError, match="fp8.*dropout_p"):
        mk.attention(q, k, v, dropout_p=0.1, fp8="dynamic")
    with pytest.raises(ValueError, match="rotary"):
        mk.attention(q8, k8, v8, fp8=(one, one, one), rotary=(torch.ones(8, 64), torch.zeros(8, 64)))
    with pytest.raises(ValueError, match="fp8.*return_scores"):
        mk.attention(q, k, v, fp8="dynamic", return_scores=dict(query_index=None))
    with pytest.raises(ValueError, match="out_dtype"):
        mk.attention(q, k, v, out_dtype=torch.float16)
    with pytest.raises(ValueError, match="out_dtype"):
        mk.attention(q, k, v, fp8="dynamic", out_dtype=torch.int8)
    with pytest.raises(ValueError, match="key"):  # the bf16 op's checks apply: head dims must match
        mk.attention(q, k[..., :32], v, fp8="dynamic")
    qp, kp, vp = (t[0].transpose(0, 1) for t in (q, k, v))
    cu = torch.tensor([0, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match="fp8"):
        mk.attention_varlen(qp.to(E4M3), kp.to(E4M3), vp.to(E4M3), cu, cu,
                            fp8=dict(q_descale=torch.ones(1, 2), k_descale=one, v_descale=one))
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        mk.attention_varlen(qp, kp, vp, cu.long(), cu, fp8="dynamic")
    with pytest.raises(ValueError, match="return_scores.*fp8"):
        mk.attention_varlen(qp, kp, vp, cu, cu, fp8="dynamic", return_scores=dict(query_index=0))


def test_fallback_warns_once_and_runs_bf16(monkeypatch):
    """No fp8 kernel for the call (here: CPU tensors without the interpreter; on a GPU: below
    sm_89, or D > 256): one warning, the bf16 path on dequantised inputs; forced Triton raises."""
    import mmkernels.ops.attention_fp8 as F

    if HAS_CUDA:
        pytest.skip("the reason exercised here is CPU-only")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(F, "_warned", set())
    q, k, v = _dense(1, 2, 2, 9, 9, 64)
    (q8, qd), (k8, kd), (v8, vd) = (quantize(x, (-2, -1)) for x in (q, k, v))
    with pytest.warns(UserWarning, match="fp8 not used.*TRITON_INTERPRET"):
        out = mk.attention(q8, k8, v8, fp8=dict(q_descale=qd, k_descale=kd, v_descale=vd))
    deq = [(x8.float() * xd[..., None, None]).to(torch.bfloat16) for x8, xd in ((q8, qd), (k8, kd), (v8, vd))]
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(*deq), atol=1e-2, rtol=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once
        mk.attention(q8, k8, v8, fp8=dict(q_descale=qd, k_descale=kd, v_descale=vd))
    with pytest.raises(mk.BackendNotSupportedError, match="fp8"):
        mk.attention(q, k, v, fp8="dynamic", backend="triton")


@needs_fp8_device
def test_fallback_head_dim_over_256():
    import mmkernels.ops.attention_fp8 as F

    F._warned.clear()
    q, k, v = _dense(1, 1, 1, 3, 3, 264)
    with pytest.warns(UserWarning, match="head dim 264"):
        out = mk.attention(q, k, v, fp8="dynamic")
    torch.testing.assert_close(out.double().cpu(), sdpa64(q.cpu(), k.cpu(), v.cpu()), atol=2e-2, rtol=2e-2)


@needs_fp8_device
def test_compile_fullgraph():
    q, k, v = _dense(1, 2, 2, 20, 20, 72)
    qp, kp, vp, cu = _packed([7, 13], 2, 2, 72)

    def f(q, k, v, qp, kp, vp, cu):
        a = mk.attention(q, k, v, is_causal=True, fp8="dynamic")
        b = mk.attention_varlen(qp, kp, vp, cu, cu, max_seqlen_q=13, max_seqlen_k=13, fp8="dynamic")
        return a, b

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        a, b = compiled(q, k, v, qp, kp, vp, cu)
        ea, eb = f(q, k, v, qp, kp, vp, cu)
    assert torch.equal(a, ea) and torch.equal(b, eb)


@needs_fp8_device
def test_opcheck():
    q, k, v = _dense(1, 2, 1, 12, 12, 64)
    op = torch.ops.mmkernels.attention_fp8_fwd.default
    torch.library.opcheck(op, (q, k, v, None, None, None, None, None, None, True, 0.125, True, torch.bfloat16))
    (q8, qd), (k8, kd), (v8, vd) = (quantize(x, (-2, -1)) for x in (q, k, v))
    # float8 inputs: not test_schema (its mutation check multiplies the inputs, which float8 cannot on CPU)
    fp8_utils = ("test_faketensor", "test_aot_dispatch_static", "test_aot_dispatch_dynamic")
    torch.library.opcheck(op, (q8, k8, v8, None, qd, kd, vd, None, None, False, 0.125, False, torch.bfloat16),
                          test_utils=fp8_utils)
    qp, kp, vp, cu = _packed([5, 7], 2, 2, 64)
    op = torch.ops.mmkernels.attention_varlen_fp8_fwd.default
    cos, sin = torch.ones(12, 32, device=DEVICE), torch.zeros(12, 32, device=DEVICE)
    torch.library.opcheck(op, (qp, kp, vp, cu, cu, None, None, None, cos, sin, None, None, True, 0.125, True,
                               torch.bfloat16))
    scale = torch.ones(2, device=DEVICE)
    torch.library.opcheck(op, (qp.to(E4M3), kp.to(E4M3), vp.to(E4M3), cu, cu, scale, scale, scale, None, None, 7, 7,
                               False, 0.125, False, torch.float16), test_utils=fp8_utils)


def test_split_head_dim_fp8():
    from mmkernels.kernels._fp8 import split_head_dim_fp8

    assert [split_head_dim_fp8(d) for d in (8, 32, 64, 72, 80, 88, 96, 112, 128, 136)] == [
        (32, 0), (32, 0), (64, 0), (64, 32), (64, 32), (64, 32), (64, 32), (128, 0), (128, 0), (128, 32)]

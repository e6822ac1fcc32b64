"""Every tensor argument of every public op honours its strides, on every backend that takes the call.

One generic driver.  For each public op (``mk.__all__``) a few valid base calls are listed in
``CALLS``; the driver finds the tensor arguments of each call itself (every tensor in its kwargs,
the members of tuples such as ``rotary=(cos, sin)``) and feeds each, one at a time, as

* ``transposed`` — the same values in a storage with the last two dims swapped,
* ``step`` — every other element of a wider buffer whose gaps hold poison (NaN, or a huge
  integer that would index out of bounds if read),
* ``offset`` — a storage offset of 5 elements (also breaks 16-byte alignment), poison before it,
* ``expanded`` — stride 0 along the first dim of size > 1 (values repeated; integer tensors of
  prefix sums / positions skip it: repeated values would not be a valid call),

on every backend of the op's dispatch registry that accepts the contiguous call, comparing the
output and the gradient of every floating leaf with the same call on ``.contiguous()`` copies.

Coverage is derived, not listed: ``test_every_tensor_parameter_is_driven`` fails when a public
function gains a parameter that can hold a tensor (annotated ``Tensor`` or unannotated and not
in ``NOT_TENSOR``) that no base call passes as a tensor, or when a public function taking tensors
has no base call.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from conftest import DEVICE
from helpers import assert_close_abs

import mmkernels as mk
from mmkernels import dispatch

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# unannotated parameters that never hold a tensor
NOT_TENSOR = {"dim", "fill", "keep", "grid", "kernel_size", "stride", "output_size"}
# public callables that take no tensor to drive (modules, context managers, model patching)
NOT_OPS = {"use_backend", "patch", "unpatch", "register_hf"}
# output buffers (written in place, inference-only: this driver compares gradients), driven by
# their own layout tests: op -> {parameter: where}
OUTPUT_BUFFERS = {"attention_varlen": {"out": "tests/test_capture_contract.py::test_out_layouts"}}
# integer arguments whose values must stay a valid call when repeated (no 'expanded' layout)
NO_EXPAND = {"cu_seqlens_q", "cu_seqlens_k", "query_index", "protect"}

B, H, LQ, LK, D = 2, 2, 9, 7, 16


def _r(*shape, grad=True):
    return torch.randn(*shape, device=DEVICE, requires_grad=grad)


def _rotary(n, d):
    f = torch.randn(n, d // 2, device=DEVICE) * 2
    f = torch.cat((f, f), -1)
    return f.cos(), f.sin()


def _calls():
    """op name -> list of (call id, kwargs) of valid calls."""
    q, k, v = _r(B, H, LQ, D), _r(B, H, LK, D), _r(B, H, LK, D)
    qs, ks = _r(B, H, LQ, D), _r(B, H, LQ, D)
    cu = torch.tensor([0, 5, 5, 12, 20], dtype=torch.int32, device=DEVICE)
    lse = torch.logsumexp((q @ k.transpose(-1, -2)).detach().float() / math.sqrt(D), -1)
    x = _r(B, 16, 8)
    hid = _r(B, 9, 8)
    return {
        "attention": [
            ("mask", dict(query=q, key=k, value=v, attn_mask=_r(B, H, LQ, LK))),
            ("rotary", dict(query=qs, key=ks, value=_r(B, H, LQ, D), rotary=_rotary(LQ, D), is_causal=True)),
        ],
        "attention_varlen": [
            ("rotary", dict(query=_r(20, H, D), key=_r(20, H, D), value=_r(20, H, D), cu_seqlens_q=cu,
                            cu_seqlens_k=cu, rotary=_rotary(20, D), is_causal=True)),
        ],
        "attention_scores": [
            ("lse-index-mask", dict(query=q.detach(), key=k.detach(), lse=lse,
                                    query_index=torch.tensor([[0, 3, 8], [1, 1, 5]], device=DEVICE),
                                    attn_mask=torch.randn(B, 1, LQ, LK, device=DEVICE))),
        ],
        "qformer_cross_attention": [
            ("mask", dict(hidden_states=_r(B, 5, 32), encoder_hidden_states=_r(B, LK, 24),
                          q_weight=_r(32, 32), q_bias=_r(32), k_weight=_r(32, 24), k_bias=_r(32),
                          v_weight=_r(32, 24), v_bias=_r(32), num_heads=2,
                          encoder_attention_mask=torch.randn(B, 1, 5, LK, device=DEVICE))),
        ],
        "token_pool": [
            ("avg-layernorm", dict(x=x, mode="avg", kernel_size=2, norm="layernorm", norm_weight=_r(8),
                                   norm_bias=_r(8))),
            ("merge-rmsnorm", dict(x=_r(B, 17, 8), mode="merge", kernel_size=2, has_cls=True, keep_cls=False,
                                   norm="rmsnorm", norm_weight=_r(32))),
        ],
        "gather_tokens": [("index", dict(x=hid, index=torch.tensor([[0, 4, 8], [2, 3, 7]], device=DEVICE)))],
        "restore_tokens": [("index", dict(kept=_r(B, 3, 8), index=torch.tensor([[0, 4, 8], [2, 3, 7]], device=DEVICE),
                                          length=9))],
        "select_tokens": [("protect", dict(hidden_states=hid, scores=torch.randn(B, 9, device=DEVICE), keep=4,
                                           protect=torch.tensor([0, 8], device=DEVICE)))],
    }


def _tensor_args(kwargs):
    """(path, tensor) of every tensor in a call: ("query",), ("rotary", 0), ..."""
    for name, val in kwargs.items():
        if isinstance(val, torch.Tensor):
            yield (name,), val
        elif isinstance(val, (tuple, list)):
            for i, t in enumerate(val):
                if isinstance(t, torch.Tensor):
                    yield (name, i), t


def _ops():
    return {name: getattr(mk, name) for name in mk.__all__
            if inspect.isfunction(getattr(mk, name)) and name not in NOT_OPS}


def _cases():
    cases = []
    for op, calls in _calls().items():
        backends = [b.name for b in dispatch._registry.get(op, [])] or [None]
        for call_id, kwargs in calls:
            for path, t in _tensor_args(kwargs):
                arg = ".".join(str(p) for p in path)
                for layout in ("transposed", "step", "offset", "expanded"):
                    if layout == "transposed" and t.dim() < 2:
                        continue
                    if layout == "expanded" and (path[0] in NO_EXPAND or max(t.shape) <= 1):
                        continue
                    for backend in backends:
                        cases.append(pytest.param(op, call_id, path, layout, backend,
                                                  id=f"{op}-{call_id}-{arg}-{layout}-{backend}"))
    return cases


def _poison(t):
    return float("nan") if t.is_floating_point() else 10**6


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """A view with t's values (for 'expanded': t's first slice repeated) in another layout;
    differentiable in t."""
    if layout == "transposed":
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "step":
        buf = torch.full((*t.shape[:-1], 2 * t.shape[-1]), _poison(t), dtype=t.dtype, device=t.device)
        buf = buf.clone() if t.requires_grad else buf
        buf[..., ::2] = t
        return buf[..., ::2]
    if layout == "offset":
        buf = torch.full((t.numel() + 5,), _poison(t), dtype=t.dtype, device=t.device)
        buf[5:] = t.reshape(-1)
        return buf[5:].view(t.shape)
    dim = next(i for i, s in enumerate(t.shape) if s > 1)
    return t.narrow(dim, 0, 1).expand(t.shape)


def _set(kwargs, path, value):
    out = dict(kwargs)
    if len(path) == 1:
        out[path[0]] = value
    else:
        seq = list(out[path[0]])
        seq[path[1]] = value
        out[path[0]] = type(kwargs[path[0]])(seq)
    return out


def _run(op, kwargs, backend):
    """Output and the gradients of every floating leaf tensor of the call."""
    leaves = [t for _, t in _tensor_args(kwargs) if t.is_leaf and t.requires_grad]
    with mk.use_backend(backend):
        out = _ops()[op](**kwargs)
    outs = out if isinstance(out, tuple) else (out,)
    outs = [o for o in outs if isinstance(o, torch.Tensor)]
    grads = []
    diff = [o for o in outs if o.requires_grad]
    if diff and leaves:
        g = torch.Generator().manual_seed(3)
        seeds = [torch.randn(o.shape, generator=g).to(o.device, o.dtype) for o in diff]
        grads = torch.autograd.grad(diff, leaves, seeds, allow_unused=True)
    return outs, grads


@pytest.mark.parametrize("op, call_id, path, layout, backend", _cases())
def test_layout_equals_contiguous(op, call_id, path, layout, backend):
    torch.manual_seed(0)
    kwargs = dict(_calls()[op])[call_id]
    t = dict(_tensor_args(kwargs))[path]
    leaf = t.detach().clone().requires_grad_(t.requires_grad)
    view = _layout(leaf, layout)
    assert torch.equal(view.contiguous(), view.contiguous()) and view.shape == t.shape
    if layout != "expanded":
        assert view.is_contiguous() is False or view.storage_offset() > 0, "the layout must differ"
    try:
        expected = _run(op, _set(kwargs, path, view.contiguous()), backend)
    except mk.BackendNotSupportedError as exc:
        pytest.skip(f"backend {backend} does not take this call: {exc}")
    got = _run(op, _set(kwargs, path, view), backend)  # an accepting backend must take every layout
    for name, a, e in [(f"out{i}", a, e) for i, (a, e) in enumerate(zip(got[0], expected[0]))] + \
                      [(f"grad{i}", a, e) for i, (a, e) in enumerate(zip(got[1], expected[1]))]:
        if e is None:
            assert a is None, f"{name}: a gradient only for the strided layout"
            continue
        if not e.is_floating_point():
            assert torch.equal(a, e), f"{name}: differs"
            continue
        assert torch.equal(a.isnan(), e.isnan()), f"{name}: NaN pattern differs (poison read?)"
        assert_close_abs(name, a.nan_to_num(), e.nan_to_num(), 1e-5 * max(1.0, float(e.nan_to_num().abs().max())))


def test_every_tensor_parameter_is_driven():
    calls = _calls()
    ops = _ops()
    for name, fn in ops.items():
        params = inspect.signature(fn).parameters
        tensor_params = {p for p, prm in params.items()
                         if ("Tensor" in str(prm.annotation)) or
                         (prm.annotation is inspect.Parameter.empty and p not in NOT_TENSOR)}
        if not tensor_params:
            continue
        assert name in calls, f"mk.{name} takes tensors ({sorted(tensor_params)}) but has no base call in CALLS"
        driven = {path[0] for _, kw in calls[name] for path, _ in _tensor_args(kw)}
        missing = tensor_params - driven - set(OUTPUT_BUFFERS.get(name, {}))
        assert not missing, f"mk.{name}: tensor parameters {sorted(missing)} are in no base call"


def test_driver_case_count():
    """The note's figure: (op, call, argument, layout, backend) cases the driver generates."""
    n = len(_cases())
    assert n > 150, n

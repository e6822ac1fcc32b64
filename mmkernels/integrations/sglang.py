"""SGLang plug-in: ``--mm-attention-backend mmkernels`` for the vision encoders.

Route: SGLang's general plug-ins.  ``pyproject.toml`` declares the entry point
``mmkernels = "mmkernels.integrations.sglang:register"`` in the group ``sglang.srt.plugins``;
SGLang's ``load_plugins()`` (every process: launcher, scheduler, workers; before the server
arguments are parsed) calls :func:`register` unless ``SGLANG_PLUGINS`` lists other plug-ins only.
:func:`register`:

* adds :class:`MMKernelsVisionAttention` (built by :func:`build_backend_class`) to
  ``sglang.srt.layers.attention.vision.QKV_BACKEND_IMPL`` under the name ``mmkernels``;
* registers an AFTER hook on ``ServerArgs.add_cli_args`` that adds ``mmkernels`` to the
  ``--mm-attention-backend`` choices (argparse builds them per call from the ``Mm`` field's
  annotation, so they cannot be extended once);
* registers an AFTER hook on ``VisionAttention.__init__`` that refuses, when the model is built,
  a layer this backend cannot run exactly: attention sinks with a sliding window (MiMo-VL's
  windowed blocks, ``use_sink=True``): ``ValueError`` naming the layer and the backends that
  honour it — never a silently different result;
* registers AFTER hooks on the ViT CUDA-graph runners' ``__init__`` (Qwen2.5-VL/Qwen3-VL,
  InternVL) so that ``SGLANG_VIT_ENABLE_CUDA_GRAPH=1`` works with ``mmkernels``: they hand this
  backend the list-form ``cu_seqlens`` they build for ``triton_attn`` and a preallocated
  ``output_ws`` (the runners otherwise stop with "does not support attention backend").

Nothing changes until a server is started with ``--mm-attention-backend mmkernels`` (or a model
asks for that backend).  The backend, for packed ``(B·S, H, D)`` q/k/v:

* ``cu_seqlens`` a tensor (prefix sums over the ``B·S`` rows), a ``SingletonCache``, None
  (every batch row one sequence of ``seq_len``), the CUDA-graph list form (``[cu_seqlens, ...]``)
  or ``forward_metadata.cu_seqlens``; one :func:`mmkernels.attention_varlen` call, GQA read
  in-kernel, no host read.  ``max_seqlen`` (and ``sequence_lengths``) are accepted and not
  needed: the kernel's grid comes from shapes alone.  Rows past ``cu_seqlens[-1]`` (none in
  SGLang's packings today) and trailing empty sequences are the op's padding (capture
  contract: real rows bit-identical, tail rows 0);
* ``output_ws``: the kernel writes the result straight into that buffer (``out=``), which is
  returned (copied into it only when its shape or dtype differs, or under autograd);
* ``window_size``: (-1, -1) (SGLang's value for full attention, and the only one it passes
  without attention sinks) is honoured as full attention within each sequence; any other window,
  or ``s_aux`` (sinks), raises ``NotImplementedError`` — SGLang's ``triton_attn`` silently ignores
  both, ``fa3`` honours them.  Qwen2.5-VL's windows are not ``window_size``: its window blocks
  pass ``cu_window_seqlens`` as ``cu_seqlens``, which this backend honours like any packing;
* ``attention_mask`` (a (B, 1, S, S) / (1, S, S) bool mask, as SGLang's ``sdpa`` backend takes):
  one :func:`mmkernels.attention` call with that mask, in place of ``cu_seqlens``, as ``sdpa``;
* ``softmax_in_single_precision``: always (the kernels keep the softmax in fp32).

Importing this module does not import SGLang; :func:`register` and :func:`build_backend_class`
do.
"""

from __future__ import annotations

import inspect
import logging
import math
from typing import Any

import torch

from ..ops.attention import attention
from ..ops.attention_varlen import attention_varlen

__all__ = ["BACKEND_NAME", "TESTED_SGLANG_VERSIONS", "build_backend_class", "extend_cli_choices", "register"]

BACKEND_NAME = "mmkernels"
TESTED_SGLANG_VERSIONS = ("0.5.23",)
_VISION = "sglang.srt.layers.attention.vision"
_CLI_TARGET = "sglang.srt.server_args.ServerArgs.add_cli_args"
_LAYER_TARGET = f"{_VISION}.VisionAttention.__init__"
_GRAPH_RUNNERS = ("sglang.srt.multimodal.vit_cuda_graph_runner.ViTCudaGraphRunner.__init__",
                  "sglang.srt.multimodal.internvl_vit_cuda_graph_runner.InternViTCudaGraphRunner.__init__")
_CLI_OPTION = "--mm-attention-backend"

logger = logging.getLogger("sglang.srt.plugins.mmkernels")

_CLASS: list = []
_FULL_WINDOWS = (None, (-1, -1))


def _out_supported() -> bool:
    """Whether :func:`mmkernels.attention_varlen` writes into a caller's buffer (``out=``)."""
    try:
        return "out" in inspect.signature(attention_varlen).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return False


def extend_cli_choices(parser) -> bool:
    """Add ``mmkernels`` to the choices of ``--mm-attention-backend`` in ``parser`` (an
    ``argparse.ArgumentParser`` that ``ServerArgs.add_cli_args`` filled).  Returns whether the
    option was found."""
    for action in getattr(parser, "_actions", ()):
        if _CLI_OPTION in getattr(action, "option_strings", ()):
            if action.choices is not None and BACKEND_NAME not in action.choices:
                action.choices = [*action.choices, BACKEND_NAME]
            return True
    return False


def _cli_hook(result, *args, **kwargs):
    parser = args[0] if args else kwargs.get("parser")
    if parser is not None and not extend_cli_choices(parser):
        logger.warning("mmkernels: %s not found by ServerArgs.add_cli_args; the backend is registered but cannot be "
                       "chosen on the command line", _CLI_OPTION)
    return result


def _layer_hook(result, self, *args, **kwargs):
    if getattr(self, "qkv_backend_name", None) != BACKEND_NAME:
        return result
    sinks = getattr(self, "sinks", None)
    window = tuple(getattr(self, "window_size", (-1, -1)) or (-1, -1))
    if sinks is not None:
        raise ValueError(
            f"--mm-attention-backend {BACKEND_NAME}: this vision attention layer uses attention sinks"
            f"{f' with a sliding window {window}' if window != (-1, -1) else ''} (MiMo-VL's windowed blocks), which "
            f"mmkernels does not implement; choose --mm-attention-backend fa3 (it honours both) for this model")
    return result


def _graph_runner_hook(result, self, *args, **kwargs):
    if getattr(self, "_attn_backend", None) == BACKEND_NAME:
        # the runners build their list-form cu_seqlens and output_ws by backend name; the
        # triton_attn form ([cu_seqlens, seq_lens, max_seqlen]) is the one this backend reads
        self._attn_backend = "triton_attn"
        logger.info("mmkernels: ViT CUDA graph runner %s hands mmkernels the triton_attn call form",
                    type(self).__name__)
    return result


def register() -> bool:
    """The ``sglang.srt.plugins`` entry point.  Returns whether the backend was added; never
    raises (a failure is logged and SGLang's backends stay as they are)."""
    try:
        return _register()
    except Exception as e:  # noqa: BLE001 - a plug-in must never stop the server
        logger.warning("mmkernels: not registered as SGLang's %r multimodal attention backend (%s: %s)",
                       BACKEND_NAME, type(e).__name__, e)
        return False


def _register() -> bool:
    import importlib

    import sglang
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    import mmkernels

    version = str(getattr(sglang, "__version__", "unknown"))
    vision = importlib.import_module(_VISION)
    table = getattr(vision, "QKV_BACKEND_IMPL", None)
    if not isinstance(table, dict):
        logger.warning("mmkernels: SGLang %s has no %s.QKV_BACKEND_IMPL (tested with SGLang %s); not registered",
                       version, _VISION, ", ".join(TESTED_SGLANG_VERSIONS))
        return False
    current = table.get(BACKEND_NAME)
    if current is not None and not getattr(current, "_mmkernels", False):
        logger.warning("mmkernels: SGLang's QKV_BACKEND_IMPL already has a %r entry (%r); left in place",
                       BACKEND_NAME, current)
        return False
    table[BACKEND_NAME] = build_backend_class()
    if current is None:  # first registration in this process: the hooks once
        HookRegistry.register(_CLI_TARGET, _cli_hook, HookType.AFTER)
        HookRegistry.register(_LAYER_TARGET, _layer_hook, HookType.AFTER)
        for target in _GRAPH_RUNNERS:
            HookRegistry.register(target, _graph_runner_hook, HookType.AFTER)
    tested = "tested with" if version in TESTED_SGLANG_VERSIONS else "not tested; tested with"
    logger.info("mmkernels %s: SGLang %s multimodal attention backend %r registered (--mm-attention-backend %s; "
                "%s SGLang %s)", mmkernels.__version__, version, BACKEND_NAME, BACKEND_NAME, tested,
                ", ".join(TESTED_SGLANG_VERSIONS))
    return True


def _resolve_cu_seqlens(cu_seqlens, bsz: int, seq_len: int, device, kwargs: dict) -> torch.Tensor:
    """int32 prefix sums on ``device`` from every form SGLang passes, without reading a device
    value on the host."""
    meta = kwargs.get("forward_metadata")
    if meta is not None:
        cu = meta.cu_seqlens
    elif isinstance(cu_seqlens, (list, tuple)):  # CUDA-graph form: [cu_seqlens, (seq_lens,) max_seqlen]
        cu = cu_seqlens[0]
    elif cu_seqlens is None:
        cu = torch.arange(0, (bsz + 1) * seq_len, seq_len, dtype=torch.int32, device=device)
    elif isinstance(cu_seqlens, torch.Tensor):
        cu = cu_seqlens
    else:  # SingletonCache (its data is set by the first layer, or here)
        from sglang.srt.layers.attention.vision import resolve_seqlens

        cu = resolve_seqlens(cu_seqlens, bsz, seq_len, device=device)
    return cu.to(device=device, dtype=torch.int32)


def build_backend_class() -> type:
    """The ``QKV_BACKEND_IMPL`` class (cached)."""
    if _CLASS:
        return _CLASS[0]
    out_kw = _out_supported()

    class MMKernelsVisionAttention(torch.nn.Module):
        """SGLang vision attention backend on :func:`mmkernels.attention_varlen` (see
        :mod:`mmkernels.integrations.sglang`)."""

        _mmkernels = True

        def __init__(self, head_dim: int | None = None, num_heads: int | None = None,
                     num_kv_heads: int | None = None, dropout: float = 0.0, flatten_batch: bool = False,
                     softmax_in_single_precision: bool = False, softmax_scale: float | None = None,
                     **kwargs: Any) -> None:
            super().__init__()
            if head_dim is None or num_heads is None:
                raise ValueError(f"{type(self).__name__}: head_dim and num_heads are required, got head_dim={head_dim}"
                                 f", num_heads={num_heads}")
            self.head_size = head_dim
            self.num_heads = num_heads
            self.num_kv_heads = num_kv_heads if num_kv_heads is not None else num_heads
            if self.num_heads % self.num_kv_heads:
                raise ValueError(f"{type(self).__name__}: num_heads ({num_heads}) is not a multiple of num_kv_heads "
                                 f"({num_kv_heads})")
            self.dropout = dropout
            self.flatten_batch = flatten_batch
            self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)

        def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens=None, bsz: int = 1,
                    seq_len: int | None = None, softmax_scale: float | None = None, **kwargs: Any) -> torch.Tensor:
            """q (B·S, H, D), k/v (B·S, Hkv, D) → (B·S, H, D)."""
            window = kwargs.get("window_size")
            if (tuple(window) if window is not None else None) not in _FULL_WINDOWS:
                raise NotImplementedError(
                    f"mmkernels vision attention: window_size={tuple(window)} (sliding-window attention) is not "
                    f"implemented; use --mm-attention-backend fa3, which honours it")
            if kwargs.get("s_aux") is not None:
                raise NotImplementedError("mmkernels vision attention: attention sinks (s_aux) are not implemented; "
                                          "use --mm-attention-backend fa3, which honours them")
            scale = softmax_scale if softmax_scale is not None else self.scale
            dropout_p = self.dropout if self.training else 0.0
            gqa = self.num_kv_heads != self.num_heads
            total = q.shape[0]
            if seq_len is None:
                seq_len = total // max(bsz, 1)
            mask = kwargs.get("attention_mask")
            if mask is not None:  # as SGLang's sdpa backend: the mask replaces cu_seqlens
                qd, kd, vd = (t.unflatten(0, (bsz, -1)).transpose(1, 2) for t in (q, k, v))
                mask = mask.to(q.device)
                if mask.dim() == 3:
                    mask = mask.unsqueeze(1)
                out = attention(qd, kd, vd, attn_mask=mask, dropout_p=dropout_p, scale=scale, enable_gqa=gqa)
                out = out.transpose(1, 2).flatten(0, 1)
            else:
                cu = _resolve_cu_seqlens(cu_seqlens, bsz, seq_len, q.device, kwargs)
                ws = kwargs.get("output_ws")
                direct = (out_kw and isinstance(ws, torch.Tensor) and ws.shape == q.shape[:2] + v.shape[-1:]
                          and ws.dtype == q.dtype and ws.device == q.device
                          and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad
                                                                or v.requires_grad)))
                extra = {"out": ws} if direct else {}
                out = attention_varlen(q, k, v, cu, cu, dropout_p=dropout_p, scale=scale, enable_gqa=gqa, **extra)
            ws = kwargs.get("output_ws")
            if isinstance(ws, torch.Tensor) and out is not ws:
                ws.copy_(out.view(ws.shape))
                return ws
            return out

    MMKernelsVisionAttention.__qualname__ = MMKernelsVisionAttention.__name__
    MMKernelsVisionAttention.__module__ = __name__
    _CLASS.append(MMKernelsVisionAttention)
    return MMKernelsVisionAttention

"""vLLM plug-in: mmkernels as the attention of vLLM's vision encoders (``MMEncoderAttention``).

Route: vLLM's documented out-of-tree mechanism.  ``pyproject.toml`` declares the entry point
``mmkernels = "mmkernels.integrations.vllm:register"`` in the group ``vllm.general_plugins``;
vLLM calls :func:`register` in every process (API server, engine core, workers) before the
model is built.  With ``MMKERNELS_VLLM=1`` (exactly ``1``) it calls
``MMEncoderAttention.register_oot(MMKernelsEncoderAttention)``, so every
``MMEncoderAttention(...)`` the vision towers construct (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, GLM-4.1V,
Pixtral, ...) is an instance of the subclass built by :func:`build_encoder_attention_class`;
vLLM then logs::

    mmkernels 0.1.0: vLLM 0.33.0's vision-encoder attention (MMEncoderAttention) runs on
    mmkernels.attention_varlen (MMKERNELS_VLLM=1; contract checked against vLLM 0.33.0)

Without the variable nothing changes (one DEBUG line).  When vLLM's class does not have the
signatures this adapter was written for (:data:`EXPECTED`), or anything else goes wrong, it logs
a WARNING saying why and leaves vLLM's own backend in place: :func:`register` never raises, since
vLLM runs general plugins without a ``try`` and an exception there would stop the engine.

The subclass (``forward_cuda`` and the native/CPU forwards; ROCm/XPU/TPU keep vLLM's):

* query ``(B, S, H·D)`` or ``(B, S, H, D)``, key/value the same with ``num_kv_heads`` (GQA:
  grouped heads are read in-kernel, never repeated), ``scale`` as given; output in the input's
  layout, contiguous, as vLLM's backends return it;
* ``cu_seqlens`` given: prefix sums over the ``B·S`` packed rows (vLLM's flash-attn
  convention); one :func:`mmkernels.attention_varlen` call per layer.  Rows past
  ``cu_seqlens[-1]`` (a CUDA-graph token budget larger than the batch) and trailing empty
  sequences (``cu_seqlens`` padded by repeating its last value) are passed straight through:
  the op's capture contract computes the real rows bit for bit as without padding and writes 0
  in the tail rows (which vLLM discards), at no attention cost;
* ``cu_seqlens`` None: every batch row is one sequence (``S`` and the key length may differ);
* ``max_seqlen`` (vLLM passes a CPU scalar tensor) and ``sequence_lengths`` are ignored: the
  kernel's grid comes from shapes alone, so nothing is read on the host (no ``.item()``,
  ``.tolist()``): the call is CUDA-graph capturable and traces into vLLM's
  ``@support_torch_compile`` vision blocks as one custom op, with no graph break;
* the metadata classmethods: ``maybe_compute_seq_lens`` returns None (no per-sequence lengths
  are needed), ``maybe_recompute_cu_seqlens`` copies the plain prefix sums to the device (never
  FlashInfer's element offsets), ``compute_max_seqlen`` returns 0;
* vLLM's FP8 ViT attention (``mm_encoder_attn_dtype="fp8"``) and an explicitly chosen FlashInfer
  (cuDNN) encoder backend keep vLLM's code, layer and metadata alike (logged once): their
  metadata is backend-specific and mmkernels has no FP8 attention.

Importing this module does not import vLLM; :func:`register` and
:func:`build_encoder_attention_class` do.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
from typing import Any

import torch

from ..ops.attention_varlen import attention_varlen

__all__ = ["ENV_VAR", "EXPECTED", "TESTED_VLLM_VERSIONS", "build_encoder_attention_class", "enabled",
           "register", "signature_problems"]

ENV_VAR = "MMKERNELS_VLLM"
TESTED_VLLM_VERSIONS = ("0.33.0",)
_MODULE = "vllm.model_executor.layers.attention.mm_encoder_attention"

# What the adapter relies on in vLLM's MMEncoderAttention (0.33.0): parameter names in order
# (after self / cls), and for __init__ the names it must accept.
EXPECTED: dict[str, tuple[str, ...]] = {
    "__init__": ("num_heads", "head_size", "scale", "num_kv_heads", "prefix"),
    "forward_cuda": ("query", "key", "value", "cu_seqlens", "max_seqlen", "sequence_lengths"),
    "forward_native": ("query", "key", "value", "cu_seqlens", "max_seqlen", "sequence_lengths"),
    "forward_cpu": ("query", "key", "value", "cu_seqlens", "max_seqlen", "sequence_lengths"),
    "compute_max_seqlen": ("attn_backend", "cu_seqlens"),
    "maybe_compute_seq_lens": ("attn_backend", "cu_seqlens", "device"),
    "maybe_recompute_cu_seqlens": ("attn_backend", "cu_seqlens", "hidden_size", "tp_size", "device",
                                   "fp8_padded_hidden_size"),
}
_CLASSMETHODS = ("compute_max_seqlen", "maybe_compute_seq_lens", "maybe_recompute_cu_seqlens", "register_oot",
                 "enabled")

# a child of vLLM's "vllm" logger: the lines appear in vLLM's log, in its format and level
logger = logging.getLogger("vllm.plugins.mmkernels")

_CLASS_CACHE: dict[int, type] = {}
_ANNOUNCED: list = []


def enabled() -> bool:
    """Whether ``MMKERNELS_VLLM`` is exactly ``"1"``."""
    return os.environ.get(ENV_VAR) == "1"


def signature_problems(cls: type) -> list[str]:
    """Why ``cls`` (vLLM's ``MMEncoderAttention``) is not the class this adapter was written
    for; empty when every method in :data:`EXPECTED` exists with those parameters."""
    problems = []
    for name in _CLASSMETHODS:
        raw = inspect.getattr_static(cls, name, None)
        if raw is None:
            problems.append(f"{cls.__name__}.{name} is missing")
        elif not isinstance(raw, classmethod):
            problems.append(f"{cls.__name__}.{name} is not a classmethod")
    for name, want in EXPECTED.items():
        fn = getattr(cls, name, None)
        if fn is None:
            if f"{cls.__name__}.{name} is missing" not in problems:
                problems.append(f"{cls.__name__}.{name} is missing")
            continue
        try:
            params = [p for p in inspect.signature(fn).parameters.values() if p.name not in ("self", "cls")]
        except (TypeError, ValueError) as e:
            problems.append(f"{cls.__name__}.{name}: signature unreadable ({e})")
            continue
        names = tuple(p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
        if name == "__init__":
            missing = [n for n in want if n not in names]
            required_extra = [p.name for p in params if p.name not in want and p.default is p.empty
                              and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
            if missing or required_extra:
                problems.append(f"{cls.__name__}.__init__{tuple(names)}: expected the parameters {want}"
                                + (f" (extra required: {required_extra})" if required_extra else ""))
        elif names != want:
            problems.append(f"{cls.__name__}.{name}{names}: expected {want}")
    return problems


def _vllm_version() -> str:
    try:
        import vllm

        return str(getattr(vllm, "__version__", "unknown"))
    except Exception:  # pragma: no cover - vLLM importable is checked before
        return "unknown"


def register() -> bool:
    """The ``vllm.general_plugins`` entry point.  Returns whether mmkernels is now vLLM's
    ``MMEncoderAttention``; never raises (a failure is logged and vLLM keeps its backend)."""
    value = os.environ.get(ENV_VAR)
    if value != "1":
        if value not in (None, "", "0"):
            logger.warning("mmkernels: %s=%r is not '1'; vLLM keeps its own vision-encoder attention", ENV_VAR,
                           value)
        else:
            logger.debug("mmkernels: %s is not set to 1; vLLM keeps its own vision-encoder attention", ENV_VAR)
        return False
    try:
        return _register()
    except Exception as e:  # noqa: BLE001 - a plug-in must never stop the engine
        logger.warning("mmkernels: not registered as vLLM's MMEncoderAttention (%s: %s); vLLM keeps its own "
                       "vision-encoder attention", type(e).__name__, e)
        return False


def _register() -> bool:
    import mmkernels

    version = _vllm_version()
    try:
        base = importlib.import_module(_MODULE).MMEncoderAttention
        from vllm.model_executor import custom_op
    except (ImportError, AttributeError) as e:
        logger.warning("mmkernels: vLLM %s has no %s.MMEncoderAttention (%s); mmkernels supports the contract "
                       "of vLLM %s; vLLM keeps its own vision-encoder attention", version, _MODULE, e,
                       ", ".join(TESTED_VLLM_VERSIONS))
        return False
    problems = signature_problems(base)
    if problems:
        logger.warning("mmkernels: vLLM %s's MMEncoderAttention differs from the contract mmkernels supports "
                       "(checked against vLLM %s): %s; vLLM keeps its own vision-encoder attention", version,
                       ", ".join(TESTED_VLLM_VERSIONS), "; ".join(problems))
        return False
    registry = getattr(custom_op, "op_registry_oot", None)
    current = registry.get(base.__name__) if isinstance(registry, dict) else None
    if current is not None:
        if getattr(current, "_mmkernels", False):
            return True  # registered earlier in this process
        logger.warning("mmkernels: %s already replaces vLLM's MMEncoderAttention (another plug-in); mmkernels "
                       "leaves it in place", f"{current.__module__}.{current.__qualname__}")
        return False
    cls = build_encoder_attention_class(base)
    base.register_oot(cls)
    checked = "checked against" if version in TESTED_VLLM_VERSIONS else "signatures match; tested with"
    logger.info("mmkernels %s: vLLM %s's vision-encoder attention (MMEncoderAttention) runs on "
                "mmkernels.attention_varlen (%s=1; contract %s vLLM %s)", mmkernels.__version__, version, ENV_VAR,
                checked, ", ".join(TESTED_VLLM_VERSIONS))
    return True


def _packed(t: torch.Tensor, heads: int, head_size: int) -> torch.Tensor:
    """(B, S, H·D) or (B, S, H, D) → (B·S, H, D); a view whenever the strides allow (vLLM's
    q/k/v are views of the fused qkv projection)."""
    if t.dim() == 3:
        t = t.unflatten(-1, (heads, head_size))
    return t.flatten(0, 1)


def build_encoder_attention_class(base: type) -> type:
    """The ``MMEncoderAttention`` subclass over :func:`mmkernels.attention_varlen` (one per
    ``base``, cached)."""
    cached = _CLASS_CACHE.get(id(base))
    if cached is not None:
        return cached
    from vllm.utils.torch_utils import async_tensor_h2d
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    deferred_backends = {AttentionBackendEnum.FLASHINFER}

    class MMKernelsEncoderAttention(base):
        """vLLM's ``MMEncoderAttention`` on :func:`mmkernels.attention_varlen` (see
        :mod:`mmkernels.integrations.vllm`)."""

        _mmkernels = True

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            why = []
            if getattr(self, "fp8_enabled", False):
                why.append("FP8 attention (mm_encoder_attn_dtype='fp8') requested")
            if getattr(self, "attn_backend", None) in deferred_backends:
                why.append(f"encoder attention backend {self.attn_backend} chosen explicitly")
            self._mk_active = not why
            if why:
                reason = "; ".join(why)
                if reason not in _ANNOUNCED:  # once per reason, not per layer
                    _ANNOUNCED.append(reason)
                    logger.warning("mmkernels: %s: these layers keep vLLM's own attention (mmkernels has no such "
                                   "path)", reason)
            elif "active" not in _ANNOUNCED:
                # vLLM's __init__ above just logged the backend it would have used
                _ANNOUNCED.append("active")
                logger.info("mmkernels: MMEncoderAttention layers run on mmkernels.attention_varlen, not %s "
                            "(%s=1)", getattr(self, "attn_backend", "vLLM's backend"), ENV_VAR)

        # --- metadata: nothing computed on the host that the kernel does not use -------------
        @classmethod
        def compute_max_seqlen(cls, attn_backend, cu_seqlens) -> int:
            if attn_backend in deferred_backends:
                return super().compute_max_seqlen(attn_backend, cu_seqlens)
            return 0

        @classmethod
        def maybe_compute_seq_lens(cls, attn_backend, cu_seqlens, device):
            if attn_backend in deferred_backends:
                return super().maybe_compute_seq_lens(attn_backend, cu_seqlens, device)
            return None

        @classmethod
        def maybe_recompute_cu_seqlens(cls, attn_backend, cu_seqlens, hidden_size, tp_size, device,
                                       fp8_padded_hidden_size=None):
            if attn_backend in deferred_backends:
                return super().maybe_recompute_cu_seqlens(attn_backend, cu_seqlens, hidden_size, tp_size, device,
                                                          fp8_padded_hidden_size=fp8_padded_hidden_size)
            return async_tensor_h2d(cu_seqlens, device=device)

        # --- forward -------------------------------------------------------------------------
        def _mk_forward(self, query, key, value, cu_seqlens=None):
            bsz, q_len = query.shape[0], query.shape[1]
            kv_len = key.shape[1]
            q = _packed(query, self.num_heads, self.head_size)
            k = _packed(key, self.num_kv_heads, self.head_size)
            v = _packed(value, self.num_kv_heads, self.head_size)
            if cu_seqlens is None:
                cu_q = torch.arange(0, (bsz + 1) * q_len, q_len, dtype=torch.int32, device=q.device)
                cu_k = torch.arange(0, (bsz + 1) * kv_len, kv_len, dtype=torch.int32, device=q.device)
            else:
                cu_q = cu_k = cu_seqlens.to(device=q.device, dtype=torch.int32)
            out = attention_varlen(q, k, v, cu_q, cu_k, scale=self.scale,
                                   enable_gqa=self.num_kv_heads != self.num_heads)
            if query.dim() == 4:
                return out.view(bsz, q_len, self.num_heads, -1)
            return out.view(bsz, q_len, -1)

        def forward_cuda(self, query, key, value, cu_seqlens=None, max_seqlen=None, sequence_lengths=None):
            if not self._mk_active:
                return super().forward_cuda(query, key, value, cu_seqlens, max_seqlen, sequence_lengths)
            return self._mk_forward(query, key, value, cu_seqlens)

        def forward_native(self, query, key, value, cu_seqlens=None, max_seqlen=None, sequence_lengths=None):
            if not self._mk_active:
                return super().forward_native(query, key, value, cu_seqlens, max_seqlen, sequence_lengths)
            return self._mk_forward(query, key, value, cu_seqlens)

        def forward_cpu(self, query, key, value, cu_seqlens=None, max_seqlen=None, sequence_lengths=None):
            # on CPU tensors mmkernels runs its SDPA route (or the Triton interpreter when
            # TRITON_INTERPRET=1): for tests; vLLM's own CPU path is the one to serve with
            if not self._mk_active:
                return super().forward_cpu(query, key, value, cu_seqlens, max_seqlen, sequence_lengths)
            return self._mk_forward(query, key, value, cu_seqlens)

        def forward_hip(self, *args, **kwargs):
            # ROCm: vLLM's own backends (mmkernels is built and tested for CUDA)
            return base.forward_cuda(self, *args, **kwargs)

    MMKernelsEncoderAttention.__qualname__ = MMKernelsEncoderAttention.__name__
    _CLASS_CACHE[id(base)] = MMKernelsEncoderAttention
    return MMKernelsEncoderAttention

"""pytest plugin: plug mmkernels into every transformers model a test suite builds.

Loaded by ``scripts/hf_model_tests.sh`` (``pytest -p hf_mmkernels_plugin`` with ``scripts/`` on
``PYTHONPATH``) to run transformers' own model test files with mmkernels in place:

* ``mmkernels.register_hf()`` at start-up, so ``attn_implementation="mmkernels"`` exists;
* a global forward pre-hook: the first time a ``PreTrainedModel`` that is not inside an
  already-patched model runs ``forward``, ``mmkernels.patch(model)`` is applied to it — the
  outermost model is called first, so a VLM is patched whole, as a user would patch it;
* without a GPU, ``TRITON_INTERPRET=1`` (set before mmkernels' kernels are imported) so the Triton
  kernels run in the interpreter; ``MMK_HF_BACKEND=triton`` forces the Triton backend.

At the end it prints how many models were patched and how many patch() calls raised.
"""

from __future__ import annotations

import os
import weakref

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("MMK_HF_BACKEND"):
    os.environ["MMKERNELS_BACKEND"] = os.environ["MMK_HF_BACKEND"]

_seen: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()
_stats = {"patched": 0, "errors": 0}
_handle = None


def _pre_hook(module, args):
    from transformers import PreTrainedModel

    if not isinstance(module, PreTrainedModel) or module in _seen:
        return None
    import mmkernels as mk

    for m in module.modules():
        _seen.add(m)
    try:
        # override_eager: HF tests pin "eager" where they compare attention weights; the plugin is
        # there to run those tests through mmkernels (output_attentions included)
        mk.patch(module, override_eager=True)
        _stats["patched"] += 1
    except Exception as exc:  # reported, never hidden: the test then runs unpatched
        _stats["errors"] += 1
        print(f"\n[mmkernels] patch({type(module).__name__}) raised {type(exc).__name__}: {exc}")
    return None


def pytest_configure(config):
    global _handle
    import mmkernels as mk

    mk.register_hf()
    _handle = torch.nn.modules.module.register_module_forward_pre_hook(_pre_hook)


def pytest_unconfigure(config):
    if _handle is not None:
        _handle.remove()


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(
        f"[mmkernels] models patched: {_stats['patched']}, patch() errors: {_stats['errors']}, "
        f"backend: {os.environ.get('MMKERNELS_BACKEND', 'auto')}, "
        f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}"
    )

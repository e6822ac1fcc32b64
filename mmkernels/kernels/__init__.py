"""Triton kernels and their launchers, one module per kernel family.

``compile_report(arch=90)``: every kernel launch compiled for a CUDA target without a GPU, with
a real launch's specialisation (see :mod:`.compile_report`; ``mmkernels inspect`` prints it).
Loaded on first use: ``import mmkernels`` imports no kernel module.
"""


def __getattr__(name: str):
    if name == "compile_report":
        import importlib

        return importlib.import_module(".compile_report", __name__)  # a callable module: see there
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""The command-line tools that are not a benchmark (``mmkernels bench`` is :mod:`mmkernels.bench`).

=====================  ==================================================================
``info.py``            ``mmkernels info``: versions, devices, build state, each op's usable
                       backends, the device's measured ceilings (cached per device)
``compile_report.py``  ``mmkernels inspect``: every kernel launch compiled for a CUDA target
                       without a GPU — registers, spills, shared memory, tensor-core ops, loads
=====================  ==================================================================

``compile_report(arch=90)`` (this package's attribute) calls :func:`.compile_report.compile_report`.
Nothing here is imported by ``import mmkernels``; each tool imports the layers below it when run.
"""


def __getattr__(name: str):
    if name == "compile_report":
        import importlib

        return importlib.import_module(".compile_report", __name__)  # a callable module: see there
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

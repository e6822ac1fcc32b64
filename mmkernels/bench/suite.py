"""The glue between an op's ``BENCH`` and pytest-benchmark (``benchmarks/test_bench_<op>.py``).

Every suite file is three lines::

    from mmkernels.bench.suite import params, run
    @pytest.mark.parametrize("case", params("attention"))
    def test_attention(benchmark, case): run(benchmark, case)

:func:`params` expands the op's model presets × ``suite_backends`` × ``suite_modes`` at
collection: on the CPU the CPU backends at CPU-scaled sizes (a smoke test that stays green and
takes seconds), on CUDA the real sizes. ``torch.cuda.is_available()`` is the only device query
at collection (it does not initialise a CUDA context). An op not in this build gives a single
skipped case with the reason.

:func:`run` checks the first call's output against float64 (a fast wrong kernel fails the
suite), then on CUDA records the ``do_bench`` median (CUDA events, L2 flushed, rotating inputs)
in ``extra_info["ms_p50"]`` — the number ``mmkernels bench compare`` gates on — and lets
pytest-benchmark time the synchronised call (its own statistics, and what
``--benchmark-compare-fail`` uses).
"""

from __future__ import annotations

from dataclasses import dataclass

from . import registry, runner, timing
from .registry import ShapeSpec

__all__ = ["SuiteCase", "device", "params", "run"]


@dataclass(frozen=True)
class SuiteCase:
    op: str
    spec: ShapeSpec
    dtype: str
    mode: str
    backend: str

    def __str__(self) -> str:
        return f"{self.spec.preset}-{self.spec.id}-{self.mode}-{self.backend}"


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def params(op_name: str) -> list:
    """pytest params (``SuiteCase`` each, readable ids) for ``benchmarks/test_bench_<op>.py``."""
    import pytest

    try:
        op = registry.load(op_name)
    except registry.OpUnavailable as exc:
        return [pytest.param(None, id="unavailable", marks=pytest.mark.skip(reason=f"{op_name}: {exc}"))]
    dev = device()
    cuda = dev == "cuda"
    specs, _ = runner.plan(op, op.model_presets(), [], dev, quick=True)
    out = []
    for spec in specs:
        dtype = spec.dtype or ("bfloat16" if cuda else "float32")
        for mode in op.suite_modes[dev]:
            for backend in op.suite_backends[dev]:
                c = SuiteCase(op.name, spec, dtype, mode, backend)
                out.append(pytest.param(c, id=str(c)))
    return out


def run(benchmark, case: SuiteCase | None) -> None:
    import pytest
    import torch

    op = registry.load(case.op)
    dev = torch.device(device())
    backend = op.make_backends()[case.backend]
    why = backend.unavailable(dev)
    if why:
        pytest.skip(f"{case.backend}: {why}")
    dtype = getattr(torch, case.dtype)
    guard = op.memory_guard(backend, case.spec.shape, dtype, case.mode, dev)
    if guard:
        pytest.skip(f"{case.backend}: {guard}")

    g = torch.Generator(device=dev).manual_seed(0)
    sets = [op.make_inputs(case.spec.shape, dtype, dev, g)]
    n = timing.rotation_count(op.input_bytes(sets[0]), dev)
    sets += [op.make_inputs(case.spec.shape, dtype, dev, g) for _ in range(n - 1)]
    ref = op.reference(case.spec.shape, sets[0])
    itemsize = torch.empty((), dtype=dtype).element_size()

    with backend.context():
        cr = runner.setup_case(op, backend, case.spec, sets, ref, case.dtype, case.mode, dev)
        assert cr.check["ok"], f"{case}: output differs from float64: {cr.check}"
        key = runner.case_key(op.name, case.spec, case.dtype, case.mode, case.backend)
        flops, nbytes = op.flops(case.spec.shape, case.mode), op.bytes(case.spec.shape, itemsize, case.mode)
        benchmark.extra_info.update(key=key, shape=op.describe(case.spec.shape), scaled_from=case.spec.scaled_from,
                                    dtype=case.dtype, mode=case.mode, backend=case.backend, flops=flops,
                                    bytes=nbytes, rel_err=cr.check.get("rel_err"), device=str(dev))
        if dev.type == "cuda":
            t = timing.time_fn(cr.fn, dev, grads=cr.grads)
            benchmark.extra_info.update(ms_p50=t.ms_p50, ms_p20=t.ms_p20, ms_p80=t.ms_p80, timer=t.timer,
                                        tflops=flops / (t.ms_p50 * 1e-3) / 1e12 if flops else None,
                                        gbps=nbytes / (t.ms_p50 * 1e-3) / 1e9 if nbytes else None)

        def reset():
            for t_ in cr.grads:
                t_.grad = None

        def target():
            cr.fn()
            timing.sync(dev)

        rounds, warm = (30, 3) if dev.type == "cuda" else (5, 1)
        benchmark.pedantic(target, setup=reset, rounds=rounds, warmup_rounds=warm, iterations=1)

"""The pytest-benchmark suite (``benchmarks/test_bench_<op>.py``: ``params(op)`` and ``run``) on the
CLI's case definitions. :func:`params`: the op's model presets × ``suite_backends`` × ``suite_modes``
(``torch.cuda.is_available()`` is the only device query at collection). :func:`run`: the case
through :func:`mmkernels.bench.runner.run` — the inputs, float64 check, timer and row of ``mmkernels
bench`` — failing on a wrong output; pytest-benchmark times the same call. The rows go to ``ROWS``,
which ``benchmarks/conftest.py --mmk-json`` writes as one ``mmkernels bench --json`` document.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import cases, runner, timing

__all__ = ["ROWS", "SuiteCase", "device", "params", "run"]

#: every row the session produced, for benchmarks/conftest.py's --mmk-json
ROWS: list[dict] = []


@dataclass(frozen=True)
class SuiteCase:
    op: str
    spec: cases.ShapeSpec
    mode: str
    backend: str

    def __str__(self) -> str:
        return f"{self.spec.preset}-{self.spec.id}-{self.mode}-{self.backend}"


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def params(op_name: str) -> list:
    """pytest params (a ``SuiteCase`` each, readable ids) for ``benchmarks/test_bench_<op>.py``."""
    import pytest

    try:
        op = cases.load(op_name)
    except cases.OpUnavailable as exc:
        return [pytest.param(None, id="unavailable", marks=pytest.mark.skip(reason=f"{op_name}: {exc}"))]
    dev = device()
    specs, _, _ = runner.plan(op, op.model_presets(), [], dev, quick=True)
    return [pytest.param(c, id=str(c)) for spec in specs for mode in op.suite_modes[dev]
            for backend in op.suite_backends[dev] for c in [SuiteCase(op.name, spec, mode, backend)]]


def run(benchmark, case: SuiteCase) -> None:
    import pytest

    from . import env

    op = cases.load(case.op)
    dev = device()

    def timer(fn, device, grads, **kw):
        def target():
            fn()
            timing.sync(device)

        rounds, warm = (30, 3) if dev == "cuda" else (5, 1)
        benchmark.pedantic(target, setup=lambda: timing.reset_grads(grads), rounds=rounds, warmup_rounds=warm,
                           iterations=1)
        return timing.time_fn(fn, device, grads=grads, **kw)

    cfg = runner.RunConfig(device=dev, modes=[case.mode], backends=[case.backend], quick=True, timer=timer,
                           ceilings=env.ceilings(dev) if dev == "cuda" else None)
    rows, not_timed, fatal = runner.run(op, [case.spec], cfg)
    if not_timed:
        pytest.skip(f"{case.backend}: {not_timed[case.backend]}")
    (row,) = rows
    ROWS.append(row)
    benchmark.extra_info.update({k: row.get(k) for k in ("key", "shape", "scaled_from", "dtype", "ms_p50", "tflops",
                                                         "gbps", "pct_of_ceiling")})
    if row["status"] == "skipped" and "needs ~" in (row["reason"] or ""):
        pytest.skip(row["reason"])  # the memory guard: too large for this device, not a failure
    assert row["status"] == "ok", f"{case}: {row['reason']}"
    assert row["check"]["ok"], f"{case}: the output differs from float64: {row['check']}"
    assert not fatal

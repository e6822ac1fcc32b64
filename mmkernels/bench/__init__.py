"""The ``mmkernels`` command's machinery: ``info`` and ``bench``.

=====================  ==================================================================
``info.py``            ``mmkernels info``: versions, devices, each op's usable backends
``ceilings.py``        the device's measured copy GB/s and matmul TFLOP/s, cached per device
``timing.py``          do_bench / CUDA events on CUDA, a perf_counter loop on the CPU;
                       median and 20/80 % quantiles; rotating input sets larger than L2
``flops.py``           FLOP and byte models (what TFLOP/s and GB/s divide by)
``registry.py``        ``OpBench``: how an op's benchmark plugs in; discovery of ``cases_*.py``
``cases_<op>.py``      one per op: presets (DESIGN.md's model shapes), backends, inputs,
                       float64 check — ``attention``, ``qformer``, ``token_pool``
``runner.py``          plan, check, time, memory, speedups, % of ceiling: one row per case
``report.py``          rich/plain tables, progress, JSON, CSV, markdown, matplotlib plots
``compare.py``         ``mmkernels bench compare``: the regression gate
``suite.py``           glue for the pytest-benchmark suite (``benchmarks/test_bench_*.py``)
``env.py``             device, versions, commit, date: what every results file carries
``cli.py``             the ``bench`` subcommand's arguments
=====================  ==================================================================

No module here queries a device at import; the CLI imports an op's module only when asked for it.
"""

"""``mmkernels bench``: the one benchmark front-end, and the case definitions every runner shares.

=====================  ==================================================================
``cases.py``           the case registry: ``OpBench`` (what an op's module defines),
                       ``Backend``, ``ShapeSpec``, ``Bound``; discovery of ``cases_*.py``
``cases_<op>.py``      one per op: presets (docs/design.md's model shapes), backends, inputs,
                       float64 reference, FLOP/byte model — attention, qformer_cross_attention, ...
``runner.py``          plan, check, time, memory, speedups, % of ceiling, resume: a row per case
``timing.py``          do_bench / CUDA events on CUDA, a perf_counter loop on the CPU
``env.py``             device, versions, commit, date, the measured ceilings (cached)
``report.py``          the JSON schema, CSV, the 100-column table, markdown, progress, plots
``compare.py``         ``mmkernels bench compare``: the regression gate (reads only that JSON)
``cli.py``             ``mmkernels bench <op> | show | compare``
``suite.py``           the pytest-benchmark suite's glue (``benchmarks/test_bench_<op>.py``)
=====================  ==================================================================

Data flows one way: ``cli``/``suite`` → ``runner`` → ``cases_<op>`` → ``cases``; ``report`` and
``compare`` read rows; nothing here queries a device at import, and the CLI imports an op's module
only when asked for it. ``mmkernels info`` lives in ``mmkernels/tools/info.py`` (it reads ``env``'s ceilings).

How to add an op (say ``attention_varlen``, or a ``prune`` benchmark)
---------------------------------------------------------------------
Write one module, ``mmkernels/bench/cases_<name>.py``, ending in ``BENCH = <Name>Bench()``:

1. A frozen dataclass for one shape (``VarlenShape(seqlens, H, d, window)``) and ``PRESETS``:
   ``{"qwen2vl": [ShapeSpec("qwen2vl", "vit-4img", "label", VarlenShape(...), dtype=None)], ...}``;
   every model of ``cases.MODEL_PRESETS`` without the op maps to a string saying why (a skipped
   preset); presets beyond the models (a sweep, another model) are listed in ``extra_presets``.
2. A subclass of :class:`cases.OpBench` with ``name`` (the CLI's ``mmkernels bench <name>``), ``title``,
   ``api`` (the ``mmkernels`` attribute it needs: absent, the op is skipped with the reason),
   ``metric`` ("tflops" or "gbps"), ``convention``, ``presets`` and these methods:
   ``backends()`` → ``{name: Backend(name, description, call, why_not)}`` (``cases.mk_backend`` for
   an mmkernels backend forced through the dispatcher; ``call`` is yours: usually ``call(shape)``
   returning the function to time, raising ``cases.Skip`` for a case it cannot run);
   ``parse_shape`` (``--shape``), ``scale_for_cpu``, ``describe``, ``x`` (the plots' axis);
   ``make_inputs`` (random, never zeros, plus ``dout``); ``bind(backend, shape, inputs, grad)`` →
   ``Bound(fn, leaves, dout)``; ``reference(shape, inputs, grad)`` → float64 output slice (and the
   ``grad_checked`` inputs' gradients); ``flops`` and/or ``bytes``.
3. ``benchmarks/test_bench_<name>.py``: the three lines of :mod:`mmkernels.bench.suite`.

The CLI, ``show``/``compare``, the JSON/CSV/plots and the suite then pick it up with no other edit;
``tests/test_bench_cli.py::test_every_op_module_is_found_and_runs`` runs its presets on the CPU.
"""

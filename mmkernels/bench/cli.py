"""``mmkernels bench <op> ...``, ``bench show`` and ``bench compare``: the one benchmark front-end.

``<op>`` is every ``mmkernels/bench/cases_<op>.py`` (found without importing them, so ``--help``
is instant), or one of ``cases.OP_ALIASES``. An op whose public function is not in this build is
reported as skipped with the reason (exit code 0, and a JSON saying so with ``--json``), never a
crash. Exit codes: 0 done, 2 bad arguments, 3 a CUDA error left the context unusable (rerun with
``--resume``).
"""

from __future__ import annotations

import argparse
import sys

from . import cases

__all__ = ["CPU_THREADS", "add_parser"]

#: torch threads of a CPU run. Measured on this project's shared 2-core box: with a second process
#: busy, 2 threads turned a 0.15 ms attention into 8-40 ms (OpenMP barriers waiting out scheduler
#: ticks); 1 thread stayed at 0.18 ms. A CPU run is a smoke test: stable beats parallel.
CPU_THREADS = 1

_EPILOG = """\
examples:
  mmkernels bench attention --quick                       # every model preset, seconds on a CPU
  mmkernels bench attention --preset sweep --mode fwd,fwd+bwd --json s.json --plot s.png
  mmkernels bench attention --shape B=1,H=16,Lq=32,Lk=257,d=64,mask=pad --backends eager,triton
  mmkernels bench token_pool --json tp.json --budget-s 300   # then again with --resume
"""


def _csv(text: str | None) -> list[str]:
    return [p.strip() for p in (text or "").split(",") if p.strip()]


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "bench", help="time an op across backends on the model shapes; compare two results files",
        description="Time an op across backends (eager, torch SDPA, FlexAttention, flash-attn, xformers, "
                    "mmkernels triton/cuda) on the model shapes of docs/design.md, with a float64 check of every "
                    "backend's output; show saved results; compare two results files (the performance gate).",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    bsub = p.add_subparsers(dest="bench_command", metavar="OP")
    for op in cases.op_names():
        aliases = [a for a, name in cases.OP_ALIASES.items() if name == op]
        po = bsub.add_parser(op, aliases=aliases, help=f"time {op} (--list: its presets and backends)", epilog=_EPILOG,
                             description=f"Time {op} across backends on the model shapes of docs/design.md.",
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_run_args(po)
        po.set_defaults(func=_cmd_run, op=op)
    from . import compare

    pc = bsub.add_parser("compare", help="compare two results files; exit 1 on a regression over --threshold",
                         description=compare.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    pc.add_argument("baseline", help="the baseline JSON (e.g. benchmarks/baselines/<device>.json)")
    pc.add_argument("new", help="the new JSON")
    pc.add_argument("--threshold", type=float, default=0.10,
                    help="fail when a case's median grew by more than this fraction (default 0.10 = 10%%)")
    pc.add_argument("--fail-on-missing", action="store_true",
                    help="also fail when a baseline case is missing or not timed in the new file")
    pc.set_defaults(func=lambda a: compare.main(a.baseline, a.new, threshold=a.threshold,
                                                fail_on_missing=a.fail_on_missing))
    ps = bsub.add_parser("show", help="print the table of results files again (plain, markdown), re-plot",
                         description="Print results files of `mmkernels bench ... --json` again; --plot draws them "
                                     "(several files: one row of panels per op/dtype/mode).")
    ps.add_argument("files", nargs="+", help="JSON files written by `mmkernels bench <op> --json FILE` (not --csv)")
    ps.add_argument("--markdown", action="store_true", help="a GitHub-markdown table of the timed cases")
    ps.add_argument("--brief", action="store_true", help="timed cases only")
    ps.add_argument("--plain", action="store_true", help="no colours even on a terminal")
    ps.add_argument("--plot", metavar="FILE.png", help="speedup and throughput vs sequence length per backend")
    ps.set_defaults(func=_cmd_show)
    p.set_defaults(func=lambda a: p.print_help() or 2)
    return p


def _add_run_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what to time")
    g.add_argument("--preset", help="comma-separated: " + ", ".join(cases.MODEL_PRESETS) + ", 'all' (every model, "
                   "the default without --shape), or the op's extras (attention: sweep; token_pool: llava-video)")
    g.add_argument("--shape", action="append", default=[],
                   help="a custom shape as key=value pairs (repeatable), e.g. B=16,H=16,L=577,d=64 (--list: the keys)")
    g.add_argument("--dtype", type=cases.dtype_arg, metavar="DTYPE",
                   help=f"{cases.DTYPE_SPELLINGS}; default: each shape's model dtype (the Q-Former's float32), "
                        "else bfloat16 on CUDA, float32 on the CPU")
    g.add_argument("--backends", help="comma-separated backends (default: all that apply; --list); a backend named "
                   "here runs even where it is left out of the default set (token_pool's compile on a CPU)")
    g.add_argument("--exclude", default="", help="comma-separated backends to leave out")
    g.add_argument("--mode", help="fwd | bwd | fwd+bwd, or a comma-separated list (default: the op's)")
    g.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    g.add_argument("--quick", action="store_true", help="fewer shapes and repetitions (CPU: tiny shapes, seconds)")
    g.add_argument("--full-size", action="store_true", help="on the CPU too, run the real model sizes (slow)")
    g.add_argument("--list", action="store_true", help="print the op's presets, shapes and backends, and exit")
    t = p.add_argument_group("timing")
    t.add_argument("--warmup-ms", type=float)
    t.add_argument("--rep-ms", type=float)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--budget-s", type=float, metavar="S",
                   help="start no case after S seconds (the rest is 'not run'; --resume continues)")
    t.add_argument("--case-timeout-s", type=float, metavar="S",
                   help="watchdog: a case running longer ends the process (exit 1); --resume then skips it")
    t.add_argument("--no-rotate", action="store_true", help="one input set instead of rotating sets > 2x L2")
    t.add_argument("--no-ceilings", action="store_true", help="do not measure/read the device ceilings")
    t.add_argument("--threads", type=int, default=CPU_THREADS,
                   help=f"CPU runs: torch threads (default {CPU_THREADS}; 0 keeps torch's default)")
    o = p.add_argument_group("output")
    o.add_argument("--json", metavar="FILE", help="write the results (rewritten after every case)")
    o.add_argument("--resume", action="store_true",
                   help="keep the ok/skipped cases of --json FILE and run the rest; the case an earlier run died "
                        "in (a CUDA fault, the watchdog) is recorded as skipped")
    o.add_argument("--csv", metavar="FILE", help="write one CSV row per case")
    o.add_argument("--plot", metavar="FILE.png", help="speedup and TFLOP/s (GB/s) vs sequence length per backend")
    o.add_argument("--plain", action="store_true", help="no colours even on a terminal")
    o.add_argument("--quiet", action="store_true", help="no progress output")
    o.add_argument("--verbose", action="store_true", help="print tracebacks of skipped cases")


def _print_list(op: cases.OpBench, device) -> None:
    print(f"{op.name}: {op.title}\npresets:")
    for p, entry in op.presets.items():
        for s in [entry] if isinstance(entry, str) else entry:
            print(f"  {p:<13} {s}" if isinstance(s, str) else
                  f"  {p:<13} {s.id:<18} {op.describe(s.shape)}{f' [{s.dtype}]' if s.dtype else ''}  {s.label}")
    names, left_out = _defaults(op, device)
    print(f"backends on {device.type} (default ones marked *):")
    for name, b in op.backends().items():
        why = b.why_not(device)
        print(f"  {'*' if name in names and not why else ' '} {name:<15} "
              f"{f'not here: {why}' if why else left_out.get(name) or b.description}")


def _defaults(op: cases.OpBench, device) -> tuple[list[str], dict[str, str]]:
    """(the default backends, {backend left out: why})."""
    from .._utils import interpreting

    left = dict(op.opt_in)
    if device.type == "cpu":  # slow to build on a CPU (torch.compile): timed when --backends names them
        left.update({n: b.cpu_opt_in for n, b in op.backends().items() if b.cpu_opt_in})
    if device.type == "cpu" and interpreting():
        # (a GPU kernel that cannot run here at all stays in the set: the run reports its own reason)
        left.update({n: "TRITON_INTERPRET=1 runs the Triton kernel in the interpreter: a correctness check, far "
                        "too slow for timings to mean anything" for n, b in op.backends().items()
                     if b.gpu_kernel and not b.why_not(device)})
    return [n for n in op.backends() if n not in left], left


def _check_sizes(text: str, shape) -> None:
    """A --shape with a size below 1 (B=0, a zero-length sequence list) has nothing to time: ValueError."""
    import dataclasses

    for f in dataclasses.fields(shape):
        v = getattr(shape, f.name)
        if isinstance(v, bool) or v is None:
            continue
        if isinstance(v, int) and v < 1:
            raise ValueError(f"--shape {text!r}: {f.name}={v}: every size must be at least 1 (an empty tensor "
                             "has nothing to time)")
        if isinstance(v, tuple) and all(isinstance(x, int) for x in v) and (min(v, default=0) < 0 or sum(v) < 1):
            raise ValueError(f"--shape {text!r}: {f.name}={v}: sizes must be >= 0 and add up to at least 1")


def _fail(op: str, msg: str) -> int:
    print(f"mmkernels bench {op}: {msg}", file=sys.stderr)
    return 2


def _cmd_run(args) -> int:
    from . import report

    if args.plot and report.matplotlib_missing():
        return _fail(args.op, report.matplotlib_missing())
    if args.resume and not args.json:
        return _fail(args.op, "--resume needs --json FILE (the file to continue)")
    try:
        op = cases.load(args.op)
    except cases.OpUnavailable as exc:
        print(f"mmkernels bench {args.op}: skipped: {exc}")
        if args.json:
            report.write_json(args.json, {**report.new_doc(args.op, f"{args.op}: skipped", None), "skipped": str(exc)})
            print(f"wrote {args.json}")
        return 0

    import torch

    from . import env, runner

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return _fail(op.name, "--device cuda, but torch sees no CUDA device")
    if device.type == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.list:
        _print_list(op, device)
        return 0

    try:
        custom = [op.parse_shape(s) for s in args.shape]
        for text, spec in zip(args.shape, custom):
            _check_sizes(text, spec.shape)
    except ValueError as exc:
        return _fail(op.name, str(exc))
    presets = _csv(args.preset) or ([] if custom else ["all"])
    if "all" in presets:
        presets = [p for p in presets if p != "all"] + [p for p in op.model_presets() if p not in presets]
    unknown = [p for p in presets if p not in op.presets and p not in cases.MODEL_PRESETS + op.extra_presets]
    if unknown:
        return _fail(op.name, f"unknown preset(s) {unknown}; have: {', '.join(op.presets)}")
    names, left_out = _defaults(op, device)
    names = _csv(args.backends) or names
    bad = [b for b in names + _csv(args.exclude) if b not in op.backends()]
    if bad:
        return _fail(op.name, f"unknown backend(s) {bad}; have: {', '.join(op.backends())}")
    names = [b for b in names if b not in _csv(args.exclude)]
    try:
        cfg = runner.RunConfig(device=device, modes=_csv(args.mode) or list(op.default_modes), backends=names,
                               dtype=args.dtype, quick=args.quick, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms,
                               seed=args.seed, rotate=not args.no_rotate, verbose=args.verbose,
                               budget_s=args.budget_s, case_timeout_s=args.case_timeout_s)
    except ValueError as exc:
        return _fail(op.name, str(exc))
    specs, skipped_presets, notes = runner.plan(op, presets, custom, device, quick=args.quick,
                                                full_size=args.full_size)
    cfg.ceilings = None if args.no_ceilings else env.ceilings(device)
    config = {"argv": sys.argv[1:], "presets": presets, "shapes": args.shape, "backends": names, "modes": cfg.modes,
              "dtype": args.dtype, "quick": args.quick, "full_size": args.full_size, "warmup_ms": cfg.warmup_ms,
              "rep_ms": cfg.rep_ms, "seed": cfg.seed, "rotate": cfg.rotate, "budget_s": cfg.budget_s,
              "threads": torch.get_num_threads() if device.type == "cpu" else None,
              "float32_matmul_precision": torch.get_float32_matmul_precision()}
    doc = report.new_doc(op.name, f"mmkernels bench {op.name}: {op.title}", device, config=config,
                         ceilings=cfg.ceilings, metric=op.metric, convention=op.convention, baseline=op.baseline)
    doc.update(skipped_presets=skipped_presets, notes=notes,
               left_out={} if args.backends else {n: w for n, w in left_out.items() if n not in names})
    done, died_in = {}, None
    if args.resume:
        try:
            old = report.read_json(args.json)
            done, died_in = {r["key"]: r for r in old["cases"]}, old.get("running")
            print(f"--resume: {sum(r.get('status') in ('ok', 'skipped') for r in done.values())} case(s) kept from "
                  f"{args.json}" + (f"; the previous run died in {died_in}" if died_in else ""))
        except (OSError, ValueError) as exc:
            print(f"--resume: cannot read {args.json} ({exc}); starting afresh")

    backends = op.backends()
    total = len(specs) * len(cfg.modes) * sum(not backends[n].why_not(device) for n in names)
    so_far: list[dict] = []
    progress = report.Progress(f"bench {op.name}", enabled=not args.quiet)

    def on_row(row, event):
        if event == "done":
            so_far.append(row)
            progress(len(so_far), total, row)
        if args.json:  # a run killed mid-way (a time box, a hang, a fault) keeps what it measured
            report.write_json(args.json, {**doc, "cases": so_far, "running": row["key"] if event == "start" else None,
                                          "notes": notes + [f"PARTIAL: {len(so_far)} of {total} cases"]})

    rows, not_timed, fatal = runner.run(op, specs, cfg, done=done, died_in=died_in, on_row=on_row)
    _remeasure_stale_ceilings(op, rows, cfg, doc, notes, quiet=args.quiet)
    gpu_idle = [n for n in not_timed if backends[n].gpu_kernel]
    if device.type == "cpu":
        interp = sorted({r["backend"] for r in rows if backends[r["backend"]].gpu_kernel and r["status"] == "ok"})
        notes.append("No CUDA device: the numbers are a smoke test of the benchmark"
                     + (" at CPU-scaled sizes" if not args.full_size else "") + ", not performance results"
                     + (f"; GPU kernels not timed: {', '.join(gpu_idle)}" if gpu_idle else "")
                     + (f"; {', '.join(interp)} ran in the Triton interpreter (its check counts, its time does not)"
                        if interp else "") + ".")
    notes.extend(op.summary_notes(rows))
    doc.update(cases=rows, not_timed=not_timed, fatal=fatal, notes=notes)
    report.print_table(doc, plain=args.plain)
    for path, write in ((args.json, report.write_json), (args.csv, lambda p, d: report.write_csv(p, [d]))):
        if path:
            write(path, doc)
            print(f"wrote {path}")
    if args.plot:
        try:
            print(f"wrote {report.plot([doc], args.plot)}")
        except ValueError as exc:
            print(f"--plot: {exc}", file=sys.stderr)
    return 3 if fatal else 0


def _remeasure_stale_ceilings(op, rows, cfg, doc, notes, *, quiet=False) -> None:
    """A case over 100 % of a *cached* ceiling means the ceiling was measured on a busier machine:
    measure it again now (CPU ~0.3 s, GPU ~2 s), recompute the derived columns, and say so."""
    from . import env, report, runner

    c = cfg.ceilings or {}
    over = [r for r in rows if r.get("status") == "ok" and report.over_ceiling(r)]
    if not over or not c.get("cached") or c.get("error"):
        return
    if not quiet:
        print(f"{len(over)} case(s) over 100 % of the cached ceilings (measured {c.get('measured')}): measuring them "
              "again", file=sys.stderr)
    fresh = env.ceilings(cfg.device, remeasure=True)
    if fresh.get("error"):
        notes.append(f"ceilings: {len(over)} case(s) over 100 % of the cached ceilings; re-measuring failed: "
                     f"{fresh['error']}")
        return
    runner.add_derived(rows, op, fresh)
    cfg.ceilings = doc["ceilings"] = fresh
    notes.append(f"ceilings re-measured after the run: {len(over)} case(s) read over 100 % of the cached ones, "
                 f"measured {c.get('measured')} (copy {c.get('copy_gbps')} -> {fresh.get('copy_gbps')} GB/s, matmul "
                 f"{c.get('matmul_tflops')} -> {fresh.get('matmul_tflops')} TFLOP/s; the cache is updated)")


def _cmd_show(args) -> int:
    from . import report

    if args.plot and report.matplotlib_missing():
        return _fail("show", report.matplotlib_missing())
    docs = []
    for f in args.files:
        try:
            docs.append(report.read_json(f))
        except OSError as exc:
            return _fail("show", f"cannot read {f}: {exc.strerror or exc}")
        except ValueError as exc:
            return _fail("show", f"{exc}. `bench show` reads the JSON files `mmkernels bench <op> --json FILE` "
                                 "writes (--csv files are for spreadsheets: it does not read them back)")
    for doc in docs:
        if args.markdown:
            print(report.format_markdown(doc) + "\n")
        elif args.brief:
            print("\n".join(report.format_table(doc, brief=True)))
        else:
            report.print_table(doc, plain=args.plain)
    if args.plot:
        try:
            print(f"wrote {report.plot(docs, args.plot)}")
        except ValueError as exc:
            print(f"--plot: {exc}", file=sys.stderr)
            return 1
    return 0

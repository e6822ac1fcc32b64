"""``mmkernels bench <op> ...`` and ``mmkernels bench compare``: argument parsing and the run.

``<op>`` is every ``mmkernels/bench/cases_<op>.py`` (found without importing them, so ``--help``
is instant). An op whose public function is not in this build is reported as skipped with the
reason (exit code 0, and a JSON saying so when ``--json`` is given), never a crash.
"""

from __future__ import annotations

import argparse
import sys

from . import registry

__all__ = ["add_parser"]

_EPILOG = """\
examples:
  mmkernels bench attention --quick                       # every model preset, seconds on a CPU
  mmkernels bench attention --preset llava15,gemma3 --mode fwd,fwd+bwd --json attn.json --plot attn.png
  mmkernels bench attention --preset sweep --backends eager,sdpa-flash,triton --plot sweep.png
  mmkernels bench attention --shape B=8,H=16,L=1025,d=64 --dtype float16
  mmkernels bench compare benchmarks/baselines/nvidia-h100-80gb-hbm3.json new.json --threshold 0.10
"""


def _csv(text: str | None) -> list[str]:
    return [x.strip() for x in (text or "").split(",") if x.strip()]


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "bench", help="time an op across backends on real model shapes; compare two results files",
        description="Time an mmkernels op across backends (eager, torch SDPA, FlexAttention, flash-attn, "
                    "xformers, mmkernels triton/cuda) on the model shapes of DESIGN.md, with a float64 check "
                    "of every backend's output; or compare two results files (the performance gate).",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    bsub = p.add_subparsers(dest="bench_command", metavar="OP")
    for op in registry.op_names():
        po = bsub.add_parser(op, help=f"time {op} (--list: its presets and backends)",
                             description=f"Time {op} across backends. Presets: the model shapes of DESIGN.md "
                                         f"(--list shows them).", epilog=_EPILOG,
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
                    help="also fail when a baseline case is missing or skipped in the new file")
    pc.add_argument("--plain", action="store_true", help="plain-text table even when rich is importable")
    pc.set_defaults(func=_cmd_compare)

    ps = bsub.add_parser("show", help="print the table of results files again (plain, rich or markdown), re-plot",
                         description="Print the results table of `mmkernels bench ... --json` files again: "
                                     "--markdown gives the README's table; --plot draws them (several files: "
                                     "one row of panels per op/dtype/mode).")
    ps.add_argument("files", nargs="+", help="JSON files written by `mmkernels bench <op> --json`")
    ps.add_argument("--markdown", action="store_true", help="a GitHub-markdown table of the timed cases")
    ps.add_argument("--brief", action="store_true", help="timed cases only, fewer columns")
    ps.add_argument("--plain", action="store_true", help="plain-text table even when rich is importable")
    ps.add_argument("--plot", metavar="FILE.png", help="speedup and throughput vs sequence length per backend")
    ps.set_defaults(func=_cmd_show)

    def _help(args):
        p.print_help()
        return 2

    p.set_defaults(func=_help)
    return p


def _add_run_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what to time")
    g.add_argument("--preset", default=None,
                   help="comma-separated presets: blip2, instructblip, llava15, llava-ov, gemma3, qwen2vl, internvl, "
                        "'all' (every model; the default without --shape), or the op's extras (attention: sweep)")
    g.add_argument("--shape", action="append", default=[],
                   help="a custom shape as key=value pairs (repeatable), e.g. attention B=16,H=16,L=577,d=64 "
                        "(--list shows the keys)")
    g.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                   help="default: each shape's model dtype (HF keeps the Q-Former in float32), else bfloat16 "
                        "on CUDA and float32 on the CPU")
    g.add_argument("--backends", default=None, help="comma-separated backends (default: all that apply; --list)")
    g.add_argument("--exclude", default="", help="comma-separated backends to leave out")
    g.add_argument("--mode", default=None,
                   help="fwd | bwd | fwd+bwd, or a comma-separated list (default: the op's: fwd; token_pool: "
                        "fwd,fwd+bwd)")
    g.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    g.add_argument("--quick", action="store_true",
                   help="fewer shapes and repetitions (CPU: tiny shapes, a few seconds in all)")
    g.add_argument("--full-size", action="store_true", help="on the CPU too, run the real model sizes (slow)")
    g.add_argument("--list", action="store_true", help="print the op's presets, shape keys and backends, and exit")
    t = p.add_argument_group("timing")
    t.add_argument("--warmup-ms", type=float, default=None)
    t.add_argument("--rep-ms", type=float, default=None)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--budget-s", type=float, default=None, metavar="S",
                   help="start no case after S seconds (the rest is reported as not run): fits a run in a time box")
    t.add_argument("--no-rotate", action="store_true", help="one input set instead of rotating sets > 2x L2")
    t.add_argument("--no-ceilings", action="store_true", help="do not measure/read the device ceilings")
    t.add_argument("--threads", type=int, default=None,
                   help="CPU runs: torch threads (default 1; 0 keeps torch's default). With several threads a "
                        "busy machine stalls OpenMP barriers for whole scheduler ticks")
    o = p.add_argument_group("output")
    o.add_argument("--json", metavar="FILE", help="write the results (device, versions, commit, date, cases)")
    o.add_argument("--csv", metavar="FILE", help="write one CSV row per case")
    o.add_argument("--plot", metavar="FILE.png", help="speedup and TFLOP/s (GB/s) vs sequence length per backend")
    o.add_argument("--plain", action="store_true", help="plain-text table even when rich is importable")
    o.add_argument("--quiet", action="store_true", help="no progress output")
    o.add_argument("--verbose", action="store_true", help="print tracebacks of skipped cases")


# --------------------------------------------------------------------------------------
# bench <op>
# --------------------------------------------------------------------------------------
def _skipped_doc(op: str, reason: str, args) -> dict:
    from . import env, report

    commit, dirty = env.git_commit()
    info = env.describe(None)
    return report.build_doc(op=op, title=f"{op}: skipped", env_info=info, commit=commit, dirty=dirty, ceilings=None,
                            config={"argv": sys.argv[1:]}, metric="", convention="", rows=[], not_timed={},
                            skipped_presets={}, notes=[], skipped=reason, date=env.now_iso())


def _print_list(op: registry.OpBench, device) -> None:
    print(f"{op.name}: {op.title}")
    print("presets:")
    for p, entry in op.presets.items():
        if isinstance(entry, str):
            print(f"  {p:<13} {entry}")
            continue
        for s in entry:
            dt = f" [{s.dtype}]" if s.dtype else ""
            print(f"  {p:<13} {s.id:<18} {op.describe(s.shape)}{dt}  {s.label}")
    names, notes = op.default_backends(device)
    print(f"backends on {device.type} (default ones marked *):")
    for name, b in op.make_backends().items():
        why = b.unavailable(device)
        mark = "*" if name in names and not why else " "
        state = f"not here: {why}" if why else (notes.get(name) or b.description)
        print(f"  {mark} {name:<15} {state}")


def _cmd_run(args) -> int:
    from . import report

    if args.plot and report.matplotlib_missing():
        print(f"mmkernels bench: {report.matplotlib_missing()}", file=sys.stderr)
        return 2
    try:
        op = registry.load(args.op)
    except registry.OpUnavailable as exc:
        print(f"mmkernels bench {args.op}: skipped: {exc}")
        if args.json:
            report.write_json(args.json, _skipped_doc(args.op, str(exc), args))
            print(f"wrote {args.json}")
        return 0

    import torch

    from . import ceilings as ceil
    from . import env, runner

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        print("mmkernels bench: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.type == "cpu":
        # Measured on this project's shared 2-core box: with a second process busy, 2 threads
        # turned a 0.15 ms attention into 8-40 ms (OpenMP barriers waiting out scheduler ticks);
        # 1 thread stayed at 0.18 ms. The CPU run is a smoke test: stable beats parallel.
        threads = 1 if args.threads is None else args.threads
        if threads > 0:
            torch.set_num_threads(threads)
    if args.list:
        _print_list(op, device)
        return 0

    # ---- what to run ------------------------------------------------------------------
    try:
        custom = [op.parse_shape(s) for s in args.shape]
    except ValueError as exc:
        print(f"mmkernels bench {op.name}: {exc}", file=sys.stderr)
        return 2
    presets = _csv(args.preset)
    if presets == ["all"] or (not presets and not custom):
        presets = op.model_presets()
    elif "all" in presets:
        presets = [p for p in presets if p != "all"] + [p for p in op.model_presets() if p not in presets]
    unknown = [p for p in presets if p not in op.presets and p not in registry.MODEL_PRESETS]
    if unknown:
        print(f"mmkernels bench {op.name}: unknown preset(s) {unknown}; have: {', '.join(op.presets)}",
              file=sys.stderr)
        return 2
    default_names, left_out = op.default_backends(device)
    names = _csv(args.backends) or default_names
    known = op.make_backends()
    bad = [b for b in names + _csv(args.exclude) if b not in known]
    if bad:
        print(f"mmkernels bench {op.name}: unknown backend(s) {bad}; have: {', '.join(known)}", file=sys.stderr)
        return 2
    names = [b for b in names if b not in set(_csv(args.exclude))]
    try:
        cfg = runner.RunConfig(device=device, modes=_csv(args.mode) or list(op.default_modes), backends=names,
                               dtype=args.dtype, quick=args.quick, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms,
                               seed=args.seed, rotate=not args.no_rotate, verbose=args.verbose,
                               budget_s=args.budget_s)
    except ValueError as exc:
        print(f"mmkernels bench {op.name}: {exc}", file=sys.stderr)
        return 2
    specs, skipped_presets = runner.plan(op, presets, custom, device, quick=args.quick, full_size=args.full_size)
    cfg.ceilings = None if args.no_ceilings else ceil.get(device)

    commit, dirty = env.git_commit()
    env_info = env.describe(device, nvidia_smi=True)
    config = {"argv": sys.argv[1:], "presets": presets, "shapes": args.shape, "backends": names,
              "modes": cfg.modes, "dtype": args.dtype, "quick": args.quick, "full_size": args.full_size,
              "warmup_ms": cfg.warmup_ms, "rep_ms": cfg.rep_ms, "seed": cfg.seed, "rotate": cfg.rotate,
              "budget_s": cfg.budget_s, "threads": torch.get_num_threads() if device.type == "cpu" else None,
              "float32_matmul_precision": torch.get_float32_matmul_precision()}

    def make_doc(rows, not_timed, notes, left_out):
        return report.build_doc(
            op=op.name, title=f"mmkernels bench {op.name}: {op.title}", env_info=env_info, commit=commit, dirty=dirty,
            ceilings=cfg.ceilings, config=config, metric=op.metric, convention=op.convention, rows=rows,
            not_timed=not_timed, skipped_presets=skipped_presets, notes=notes, date=env.now_iso(), left_out=left_out)

    # ---- run --------------------------------------------------------------------------
    so_far: list[dict] = []

    def step(done, total, row):
        progress(done, total, row)
        if args.json:  # rewritten after every case: a run killed by a time box keeps what it measured
            so_far.append(row)
            report.write_json(args.json, make_doc(so_far, {}, [f"PARTIAL: {done} of {total} cases so far, no derived "
                                                                  "columns (the finished run rewrites this file)"], {}))

    with report.Progress(f"bench {op.name}", enabled=not args.quiet) as progress:
        rows, not_timed, notes = runner.run(op, specs, cfg, step)
    left_out = {} if args.backends else {n: w for n, w in left_out.items() if n not in names}
    if device.type == "cpu":
        gpu = [n for n, b in known.items() if b.gpu_kernel]
        timed = sorted({r["backend"] for r in rows if r["status"] == "ok"}, key=list(known).index)
        notes.append("No CUDA device: the GPU kernels (" + ", ".join(gpu) + ") were not timed. The CPU numbers "
                     f"({', '.join(timed) or 'none'}) are a smoke test of the benchmark"
                     + (" at CPU-scaled sizes" if not args.full_size else "") + ", not performance results.")
    doc = make_doc(rows, not_timed, notes, left_out)
    report.print_table(doc, plain=args.plain)
    if args.json:
        report.write_json(args.json, doc)
        print(f"wrote {args.json}")
    if args.csv:
        report.write_csv(args.csv, [doc])
        print(f"wrote {args.csv}")
    if args.plot:
        try:
            print(f"wrote {report.plot([doc], args.plot)}")
        except ValueError as exc:
            print(f"--plot: {exc}", file=sys.stderr)
    return 3 if any(n.startswith("FATAL") for n in notes) else 0


def _cmd_show(args) -> int:
    import json

    from . import report

    if args.plot and report.matplotlib_missing():
        print(f"mmkernels bench show: {report.matplotlib_missing()}", file=sys.stderr)
        return 2
    docs = []
    for f in args.files:
        try:
            doc = json.loads(open(f).read())
        except (OSError, ValueError) as exc:
            print(f"mmkernels bench show: cannot read {f}: {exc}", file=sys.stderr)
            return 2
        if doc.get("schema") != report.SCHEMA:
            print(f"mmkernels bench show: {f} is not a `mmkernels bench --json` file", file=sys.stderr)
            return 2
        docs.append(doc)
        if args.markdown:
            print(report.format_markdown(doc, brief=args.brief) + "\n")
        elif args.brief or args.plain:
            print(report.format_plain(doc, brief=args.brief))
        else:
            report.print_table(doc)
    if args.plot:
        try:
            print(f"wrote {report.plot(docs, args.plot)}")
        except ValueError as exc:
            print(f"--plot: {exc}", file=sys.stderr)
            return 1
    return 0


def _cmd_compare(args) -> int:
    from . import compare

    return compare.main(args.baseline, args.new, threshold=args.threshold, fail_on_missing=args.fail_on_missing,
                        plain=args.plain)

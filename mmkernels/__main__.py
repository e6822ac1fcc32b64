"""The ``mmkernels`` command (also ``python -m mmkernels``).

Subcommands:
  info     versions, devices, CUDA extension state, each op's usable backends and the
           device's measured ceilings (copy GB/s, matmul TFLOP/s; cached per device)
  bench    times an op across backends on the model shapes of docs/design.md
           (``mmkernels bench attention --quick``); ``bench compare A.json B.json`` is the
           performance gate
  inspect  compiles every kernel launch for a CUDA target without a GPU and reports registers,
           spills, shared memory, tensor-core ops and load widths (``mmkernels inspect --quick``)

Heavy imports (torch, the ops) happen inside the subcommand, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import sys


def _cmd_info(args: argparse.Namespace) -> int:
    from .tools import info

    return info.main(as_json=args.json, ceilings=not args.no_ceilings, remeasure=args.remeasure, threads=args.threads)


def _version() -> str:
    """This checkout's ``mmkernels.__version__``, read without importing torch (``--version`` is instant)."""
    import re
    from pathlib import Path

    m = re.search(r'^__version__ = "([^"]+)"', (Path(__file__).parent / "__init__.py").read_text(), re.M)
    return m.group(1) if m else "unknown"


def build_parser() -> argparse.ArgumentParser:
    from .bench import cli as bench_cli

    parser = argparse.ArgumentParser(
        prog="mmkernels",
        description="Fused Triton/CUDA kernels for vision-language models.",
    )
    parser.add_argument("--version", action="version", version=f"mmkernels {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p_info = sub.add_parser(
        "info",
        help="print versions, devices, build state and each op's usable backends",
        description="Print versions, CUDA devices, TRITON_INTERPRET state, the CUDA extension's state "
        "for each op, which backend can run a small representative call on the default device, and the "
        "device's measured ceilings (a large copy in GB/s, a large matmul in TFLOP/s: bf16 on CUDA, float32 "
        "on the CPU), measured once and cached per device (and CPU thread count) in "
        "~/.cache/mmkernels/ceilings.json ($MMKERNELS_CACHE_DIR or $XDG_CACHE_HOME move it).",
    )
    p_info.add_argument("--json", action="store_true", help="print the report as JSON")
    p_info.add_argument("--remeasure", action="store_true",
                        help="measure the device ceilings again instead of reading the cache")
    p_info.add_argument("--no-ceilings", action="store_true", help="leave the device ceilings out")
    p_info.add_argument("--threads", type=int, default=bench_cli.CPU_THREADS,
                        help=f"CPU: measure the ceilings at this many torch threads (default {bench_cli.CPU_THREADS}, "
                             "as `mmkernels bench` runs; 0 keeps torch's default)")
    p_info.set_defaults(func=_cmd_info)

    bench_cli.add_parser(sub)
    # listed here for --help; `mmkernels inspect ...` is parsed by its own parser (see main)
    sub.add_parser("inspect", add_help=False,
                   help="compile the kernels for sm_90/sm_80 without a GPU: registers, spills, shared memory, "
                        "tensor-core ops (--quick: ~1.5 min; --help)")
    return parser


def main(argv: list[str] | None = None) -> int:
    if (sys.argv[1:] if argv is None else argv)[:1] == ["inspect"]:  # its own parser: tools/compile_report.py
        from .tools.compile_report import main as inspect_main

        return inspect_main((sys.argv[1:] if argv is None else argv)[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # `mmkernels bench ... | head`: the reader left, nothing is wrong
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``mmkernels`` command (also ``python -m mmkernels``).

Subcommands:
  info     versions, devices, CUDA extension state and each op's usable backends
  (bench   times ops across backends: to come, see DESIGN.md "Benchmarks")

Heavy imports (torch, the ops) happen inside the subcommand, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import sys


def _cmd_info(args: argparse.Namespace) -> int:
    from .bench import info

    return info.main(as_json=args.json)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmkernels",
        description="Fused Triton/CUDA kernels for vision-language models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p_info = sub.add_parser(
        "info",
        help="print versions, devices, build state and each op's usable backends",
        description="Print versions, CUDA devices, TRITON_INTERPRET state, the CUDA extension's state "
        "and, for each op, which backend can run a small representative call on the default device.",
    )
    p_info.add_argument("--json", action="store_true", help="print the report as JSON")
    p_info.set_defaults(func=_cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

"""The ``sslprobe`` command: ``demo`` and ``plot``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    from sslprobe.cli.demo import add_arguments

    parser = argparse.ArgumentParser(prog="sslprobe", description="Online probes for PyTorch Lightning.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="SimCLR pretraining on bundled digits with a live linear probe, then an offline comparison"
    )
    add_arguments(demo)
    plot = commands.add_parser("plot", help="plot probe metrics and losses from a Lightning CSV log")
    plot.add_argument("csv", type=Path, help="a metrics.csv written by Lightning's CSVLogger")
    plot.add_argument("-o", "--out", type=Path, default=None, help="PNG to write (default: probes.png beside it)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            from sslprobe.cli.demo import run_demo

            run_demo(args)
        else:
            from sslprobe.cli.plot import plot_metrics

            print(f"wrote {plot_metrics(args.csv, args.out)}")
    except (ModuleNotFoundError, ValueError, FileNotFoundError) as err:
        print(f"sslprobe {args.command}: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

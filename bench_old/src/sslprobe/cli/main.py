"""The ``sslprobe`` command: ``demo`` and ``plot``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    from sslprobe import __version__
    from sslprobe.cli.demo import add_arguments

    parser = argparse.ArgumentParser(prog="sslprobe", description="Online probes for PyTorch Lightning.")
    parser.add_argument("--version", action="version", version=f"sslprobe {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="SimCLR pretraining on bundled digits with a live linear probe, then an offline comparison"
    )
    add_arguments(demo)
    plot = commands.add_parser("plot", help="plot probe metrics and losses from a Lightning CSV log")
    plot.add_argument(
        "csv",
        type=Path,
        metavar="PATH",
        help="a metrics.csv written by Lightning's CSVLogger, or the run folder holding it (the folder sslprobe demo "
        "prints, or a CSVLogger folder with version_N/metrics.csv: the newest is plotted)",
    )
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
            from sslprobe.cli.plot import find_metrics_csv, plot_metrics

            csv_path = find_metrics_csv(args.csv)
            print(f"wrote {plot_metrics(csv_path, args.out)} from {csv_path}")
    except (ModuleNotFoundError, ValueError, OSError) as err:
        message = str(err)
        # Our own messages already name the command ("sslprobe plot: ...", "sslprobe demo needs ...").
        if not message.startswith(f"sslprobe {args.command}"):
            message = f"sslprobe {args.command}: {message}"
        print(message, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The ``zooscope`` command line: one subcommand per module in ``zooscope.commands``."""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from zooscope import __version__, commands

EPILOG = """examples:
  zooscope demo                                   build a small zoo, scan it, report
  zooscope analyze model.safetensors              one checkpoint's layer metrics and means
  zooscope scan ckpts/ --store zoo.zarr           analyse every checkpoint under ckpts/
  zooscope scan --manifest zoo.csv --store zoo.zarr --cluster local
  zooscope show zoo.zarr                          print the models table
  zooscope regress zoo.zarr --y top1_error --out regress/
  zooscope report zoo.zarr --out report.html
"""


class _CommandParser(argparse.ArgumentParser):
    """A subcommand's parser: its description and examples are printed as written."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zooscope",
        description="Score whole zoos of trained neural networks from their weights alone.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"zooscope {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_CommandParser)
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):  # helpers shared by the commands
            continue
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

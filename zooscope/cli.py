"""The ``zooscope`` command line: one subcommand per module in ``zooscope.commands``."""
from __future__ import annotations

import argparse
import gc
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


def command_names() -> list[str]:
    """The subcommands: one module each in ``zooscope.commands`` (``_``-prefixed modules are shared helpers)."""
    return sorted(info.name for info in pkgutil.iter_modules(commands.__path__) if not info.name.startswith("_"))


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The command line; with ``only`` (a command name) only that command's module is imported and registered,
    so that ``zooscope analyze FILE`` does not pay for the imports of every other command."""
    parser = argparse.ArgumentParser(
        prog="zooscope",
        description="Score whole zoos of trained neural networks from their weights alone.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"zooscope {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_CommandParser)
    names = command_names()
    for name in [only] if only in names else names:
        importlib.import_module(f"{commands.__name__}.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(only=argv[0] if argv else None)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


def run() -> None:
    """The ``zooscope`` program: :func:`main`, then exit. Once the command is done (its files closed) the garbage is
    collected and every object still alive is frozen out of the collector (``gc.freeze``): the interpreter's
    collections at shutdown then do not walk the hundreds of thousands of objects of numba, pandas and the analysis
    again, about 0.2–0.4 s of a short command such as ``zooscope analyze FILE``. Exit handlers, stdout and stderr
    are flushed as usual."""
    code = main()
    gc.collect()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    run()

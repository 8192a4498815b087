"""Rich tables of DataFrames for the commands that print them (``show``, ``analyze``)."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd

#: Longest text in a cell; longer text is cut with an ellipsis.
MAX_TEXT = 60
#: Console width when stdout is not a terminal: wide enough that tables are never folded.
PIPED_WIDTH = 1000


def cell(value: Any) -> str:
    """One table cell: floats to 4 significant digits (NaN empty), text cut at ``MAX_TEXT``."""
    if isinstance(value, (float, np.floating)):
        return "" if np.isnan(value) else f"{value:.4g}"
    text = str(value)
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT - 1] + "…"


def pick_columns(frame: pd.DataFrame, requested: str | None, defaults: Sequence[str]) -> list[str]:
    """The columns named in ``requested`` (comma-separated), else those of ``defaults`` that ``frame`` has.

    Raises ``ValueError`` naming the unknown columns and listing the frame's.
    """
    if not requested:
        return [c for c in defaults if c in frame.columns]
    wanted = [c.strip() for c in requested.split(",") if c.strip()]
    unknown = [c for c in wanted if c not in frame.columns]
    if unknown:
        raise ValueError(f"unknown column(s) {', '.join(unknown)}; columns: {', '.join(map(str, frame.columns))}")
    return wanted


def console():
    """A rich console on stdout; in a pipe or a log file, at the tables' natural width, not folded to 80."""
    from rich.console import Console

    out = Console()
    return out if out.is_terminal else Console(width=PIPED_WIDTH)


def print_frame(frame: pd.DataFrame, columns: Sequence[str], *, title: str, limit: int = 0) -> None:
    """Print ``title``, then ``columns`` of the first ``limit`` rows of ``frame`` (0: all) under its index.

    Rows with ``status == "error"`` are red; a last line counts the rows left out.
    """
    from rich.table import Table

    total = len(frame)
    if limit > 0:
        frame = frame.head(limit)
    table = Table()
    table.add_column(frame.index.name or "row", justify="right", style="dim")
    for col in columns:
        numeric = pd.api.types.is_numeric_dtype(frame[col].dtype)
        table.add_column(col, justify="right" if numeric else "left", overflow="fold")
    errors = frame["status"].to_numpy() == "error" if "status" in frame.columns else np.zeros(len(frame), bool)
    for (index, row), is_error in zip(frame[list(columns)].iterrows(), errors):
        table.add_row(str(index), *(cell(v) for v in row.tolist()), style="red" if is_error else None)
    out = console()
    out.print(title, markup=False, highlight=False, soft_wrap=True)
    out.print(table)
    if total > len(frame):
        out.print(f"… {total - len(frame)} more rows (--limit 0 shows all)")


def write_csv(frame: pd.DataFrame, path: str, command: str) -> bool:
    """Write ``frame`` to the CSV ``path``; False (after one error line naming ``command``) when it cannot."""
    import sys

    try:
        frame.to_csv(path, index=False)
    except OSError as exc:
        print(f"zooscope {command}: error: cannot write {path}: {exc}", file=sys.stderr)
        return False
    return True

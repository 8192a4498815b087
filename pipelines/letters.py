"""Rasterised letter masks for paper 001's Figure 1 experiment (stamp a letter onto an initial weight matrix)."""
from __future__ import annotations

import numpy as np


def letter_mask(letter: str, rows: int, cols: int) -> np.ndarray:
    """Boolean ``(rows, cols)`` bitmap of ``letter`` (one of A–Z or a–z), True inside the glyph.

    The glyph (matplotlib's bundled DejaVu Sans Bold outline) is stretched to fill the whole bitmap; a cell is
    inside when its centre is (even-odd rule, so the holes of A, B, O ... stay empty). Row 0 is the top of the
    letter, so ``plt.imshow(mask)`` shows it upright.
    """
    if not (isinstance(letter, str) and len(letter) == 1 and letter.isascii() and letter.isalpha()):
        raise ValueError(f"mask letter must be a single ASCII letter A-Z or a-z, got {letter!r}")
    if rows < 1 or cols < 1:
        raise ValueError(f"mask shape must be positive, got ({rows}, {cols})")
    from matplotlib.font_manager import FontProperties
    from matplotlib.path import Path
    from matplotlib.textpath import TextPath

    glyph = TextPath((0, 0), letter, size=1, prop=FontProperties(family="DejaVu Sans", weight="bold"))
    box = glyph.get_extents()
    xs = box.x0 + (np.arange(cols) + 0.5) / cols * box.width
    ys = box.y1 - (np.arange(rows) + 0.5) / rows * box.height
    gx, gy = np.meshgrid(xs, ys)
    centres = np.column_stack([gx.ravel(), gy.ravel()])
    inside = np.zeros(len(centres), dtype=bool)
    for polygon in glyph.to_polygons():
        inside ^= Path(polygon).contains_points(centres)
    return inside.reshape(rows, cols)

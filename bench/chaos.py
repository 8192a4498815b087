"""Crash safety, measured: SIGKILL ``zooscope scan`` and its workers at random moments and compare with a clean scan.

Scenarios (each trial kills, then reruns the same scan to completion, then compares the store with an
uninterrupted scan of the same zoo and runs the full ``check``):

- ``client``: the scan process (``--cluster none``) killed at a uniformly random moment of its run;
- ``client-local``: the scan process of a ``--cluster local`` run killed (its workers die with it or are orphaned;
  the trial kills what is left of its process group before the rerun);
- ``worker``: one worker process of a ``--cluster local`` run killed mid-run: the scan must finish by itself;
- ``commit``: a scan of many tiny models killed from inside at a commit point of the final commit (or a random
  earlier one): before any write, after half the arrays, after all data before the attrs, after the attrs;
- ``two-writers``: two scans of one store started at once: one is refused (exit 2) or waits its turn;
- ``disk-full``: a scan into a small tmpfs: exit 2 with one line, the committed store intact.

Reported per scenario: trials, models lost / duplicated / differing (vs the clean scan; target 0/0/0), stores
that ``check`` faulted after the kill and after the rerun, and the exit codes seen.

    python bench/chaos.py --quick            # a few trials of each (about 5 minutes on 2 cores)
    python bench/chaos.py --record           # >= 20 kills of each kind on 40 models, appended to RESULTS.md
"""
from __future__ import annotations

import argparse
import collections
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
POINTS = ("before-write", "mid-write", "before-attrs", "after-attrs")
DISK_KB = (640, 720, 800, 880, 960, 1200)  # tmpfs sizes of the disk-full scenario (the 40-model store needs ~900)


# ---------------------------------------------------------------------------------------------------------------
# zoo, scans, snapshots


def make_zoo(directory: Path, n: int, shape: tuple[int, int], seed: int = 0) -> Path:
    """``n`` safetensors models of three heavy-tailed ``shape`` layers each."""
    from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        tensors = {f"fc{j}.weight": (rng.standard_t(3, size=shape) / np.sqrt(shape[1])).astype(np.float32)
                   for j in range(3)}
        save_file(tensors, str(directory / f"model_{i:04d}.safetensors"))
    return directory


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def scan_argv(zoo: Path, store: Path, cluster: str, *extra: str) -> list[str]:
    argv = ["scan", str(zoo), "--store", str(store), "--cluster", cluster, "--no-progress", "--commit-seconds", "0"]
    if cluster == "local":
        argv += ["--workers", "2"]
    return [*argv, *extra]


def start(argv: list[str], inject: str | None = None) -> subprocess.Popen:
    """``zooscope`` with ``argv`` in its own process group (``inject``: ``POINT:final`` or ``POINT:N``)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--inject", inject, "--", *argv] if inject else \
        [sys.executable, "-m", "zooscope", *argv]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(), start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, (out + err).decode("utf-8", "replace")


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL whatever is left of the process group ``proc`` leads (orphaned workers)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        pass


def snapshot(store: Path) -> dict:
    """model_id -> list of (content_hash, status, alphas) over every stored row of it."""
    import zooscope

    view = zooscope.open(store)
    layers = view.layers
    alphas = {mid: tuple(np.round(g["alpha"].to_numpy(dtype=float), 12).tolist())
              for mid, g in layers.groupby("model_id", sort=False)} if len(layers) else {}
    rows = collections.defaultdict(list)
    for mid, h, status in zip(view.models["model_id"], view.models["content_hash"], view.models["status"]):
        rows[mid].append((h, status, alphas.get(mid, ())))
    return dict(rows)


def compare(ref: dict, got: dict) -> tuple[int, int, int]:
    """(lost, duplicated, differing) models of ``got`` against the clean scan ``ref``."""
    lost = sum(1 for mid in ref if mid not in got)
    duplicated = sum(len(v) - 1 for v in got.values() if len(v) > 1) + sum(1 for mid in got if mid not in ref)
    differing = sum(1 for mid, v in got.items() if mid in ref and v[0] != ref[mid][0])
    return lost, duplicated, differing


def faults(store: Path) -> int:
    """1 if ``check`` (full) finds a fault in the store or cannot open it (0 when no store exists yet)."""
    from zooscope.engine.store import ZooStore

    if not (store / "zarr.json").exists():
        return 0
    try:
        problems = ZooStore.open(store, "r").check(full=True)
    except Exception as exc:  # noqa: BLE001 - an unopenable store is a fault, whatever the reason
        problems = [repr(exc)]
    if problems:
        print(f"    check: {problems[:3]}")
    return int(bool(problems))


# ---------------------------------------------------------------------------------------------------------------
# scenarios


class Tally:
    def __init__(self, name: str) -> None:
        self.name, self.trials, self.lost, self.dup, self.diff = name, 0, 0, 0, 0
        self.faults_after_kill = self.faults_after_rerun = 0
        self.codes: collections.Counter = collections.Counter()
        self.notes: list[str] = []

    def add(self, ref: dict, store: Path, after_kill: int) -> None:
        lost, dup, diff = compare(ref, snapshot(store))
        self.trials += 1
        self.lost, self.dup, self.diff = self.lost + lost, self.dup + dup, self.diff + diff
        self.faults_after_kill += after_kill
        self.faults_after_rerun += faults(store)
        if lost or dup or diff:
            print(f"    trial {self.trials}: lost {lost}, duplicated {dup}, differing {diff}")

    def row(self) -> str:
        codes = ", ".join(f"{c}×{n}" for c, n in sorted(self.codes.items(), key=str))
        return (f"| {self.name} | {self.trials} | {self.lost} | {self.dup} | {self.diff} | {self.faults_after_kill} | "
                f"{self.faults_after_rerun} | {codes} | {'; '.join(self.notes)} |")


def rerun(zoo: Path, store: Path, cluster: str, tally: Tally) -> None:
    code, out = finish(start(scan_argv(zoo, store, cluster)))
    tally.codes[f"rerun {code}"] += 1
    if code != 0 or "Traceback" in out:
        tally.notes.append(f"rerun exit {code}: {out.strip().splitlines()[-1][:100] if out.strip() else ''}")


def client_kills(zoo: Path, ref: dict, seconds: float, trials: int, cluster: str, work: Path, rng) -> Tally:
    tally = Tally(f"client ({'--cluster ' + cluster})")
    t = attempts = 0
    while t < trials and attempts < 3 * trials:  # a scan that ended before its kill is not a trial
        attempts += 1
        store = work / f"client-{cluster}-{t}.zarr"
        proc = start(scan_argv(zoo, store, cluster))
        time.sleep(rng.uniform(0.0, 0.8 * seconds))
        os.kill(proc.pid, signal.SIGKILL)
        kill_group(proc)
        if proc.returncode != -signal.SIGKILL:
            tally.codes[f"ended before the kill ({proc.returncode})"] += 1
            shutil.rmtree(store, ignore_errors=True)
            continue
        t += 1
        tally.codes["killed"] += 1
        after = faults(store)
        rerun(zoo, store, "none", tally)
        tally.add(ref, store, after)
        shutil.rmtree(store, ignore_errors=True)
    return tally


def _workers(pid: int) -> list:
    import psutil

    try:
        kids = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    out = []
    for k in kids:
        try:
            cmd = " ".join(k.cmdline())
        except psutil.Error:
            continue
        if "spawn_main" in cmd or "forkserver" in cmd:
            out.append(k)
    return out


def worker_kills(zoo: Path, ref: dict, seconds: float, trials: int, work: Path, rng) -> Tally:
    tally = Tally("one worker (--cluster local, 2 workers)")
    for t in range(trials):
        store = work / f"worker-{t}.zarr"
        proc = start(scan_argv(zoo, store, "local"))
        deadline = time.monotonic() + 120
        while not _workers(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(rng.uniform(0.0, seconds))
        victims = _workers(proc.pid)
        if victims:
            rng.choice(victims).kill()
        else:
            tally.notes.append("scan ended before a worker could be killed")
        try:
            code, out = finish(proc, timeout=600)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            code, out = -9, "timed out after a worker kill"
        kill_group(proc)
        tally.codes[f"exit {code}"] += 1
        if code != 0:
            tally.notes.append(f"trial {t}: exit {code}: {out.strip().splitlines()[-1][:100] if out.strip() else ''}")
        after = faults(store)
        if code != 0:
            rerun(zoo, store, "none", tally)
        tally.add(ref, store, after)
        shutil.rmtree(store, ignore_errors=True)
    return tally


def commit_kills(tiny: Path, ref: dict, trials: int, work: Path, rng, flushes: int) -> Tally:
    tally = Tally("commit points (many tiny models)")
    for t in range(trials):
        point = POINTS[t % len(POINTS)]
        when = "final" if (t // len(POINTS)) % 2 == 0 else str(rng.integers(1, max(2, flushes)))
        store = work / f"commit-{t}.zarr"
        argv = ["scan", str(tiny), "--store", str(store), "--cluster", "none", "--no-progress",
                "--commit-seconds", "1000"]
        code, out = finish(start(argv, inject=f"{point}:{when}"))
        tally.codes[f"{point}@{'final' if when == 'final' else 'flush'} {code}"] += 1
        after = faults(store)
        rerun(tiny, store, "none", tally)
        tally.add(ref, store, after)
        shutil.rmtree(store, ignore_errors=True)
    return tally


def two_writers(zoo: Path, ref: dict, trials: int, work: Path) -> Tally:
    tally = Tally("two writers at once")
    for t in range(trials):
        store = work / f"two-{t}.zarr"
        procs = [start(scan_argv(zoo, store, "none")) for _ in range(2)]
        results = [finish(p) for p in procs]
        for code, out in results:
            tally.codes[f"exit {code}"] += 1
            if code == 2 and "lock" not in out.lower():
                tally.notes.append(f"exit 2 without a lock message: {out.strip()[-100:]}")
            if "Traceback" in out:
                tally.notes.append("traceback")
        if any(code != 0 for code, _ in results):
            rerun(zoo, store, "none", tally)
        tally.add(ref, store, 0)
        shutil.rmtree(store, ignore_errors=True)
    return tally


def disk_full(zoo: Path, ref: dict, work: Path) -> Tally:
    """A scan into tmpfs disks of ``DISK_KB`` sizes, from too small for the first commit to large enough."""
    tally = Tally(f"disk full (tmpfs of {min(DISK_KB)}..{max(DISK_KB)} KiB)")
    mount = work / "tmpfs"
    mount.mkdir()
    committed = []
    for kb in DISK_KB:
        made = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kb}k", "tmpfs", str(mount)], capture_output=True)
        if made.returncode != 0:
            tally.notes.append(f"not measured: cannot mount a tmpfs ({made.stderr.decode().strip()[:100]})")
            return tally
        try:
            store = mount / "s.zarr"
            code, out = finish(start(scan_argv(zoo, store, "none")))
            tally.codes[f"exit {code}"] += 1
            if "Traceback" in out or (code == 2 and len(out.strip().splitlines()) != 1):
                tally.notes.append(f"{kb} KiB: not one line: {out.strip()[-150:]}")
            tally.faults_after_kill += faults(store)
            stored = snapshot(store) if (store / "zarr.json").exists() else {}
            tally.trials += 1
            tally.dup += sum(len(v) - 1 for v in stored.values())
            tally.diff += sum(1 for mid, v in stored.items() if mid not in ref or v[0] != ref[mid][0])
            committed.append(f"{kb}: {len(stored)}")
            if code == 2 and not any("error: cannot write the store" in ln for ln in out.splitlines()):
                tally.notes.append(f"{kb} KiB: unexpected message {out.strip()[-100:]}")
        finally:
            subprocess.run(["umount", str(mount)], capture_output=True)
    tally.notes.append(f"models committed per KiB: {', '.join(committed)} of {len(ref)}; lost not counted "
                       "(a full disk stores what fits)")
    return tally


# ---------------------------------------------------------------------------------------------------------------
# injected kills (run in the scan's own process)


def inject_and_run(spec: str, argv: list[str]) -> int:
    """Run ``zooscope argv`` with a SIGKILL at commit point ``POINT`` of the final flush (``final``) or flush N."""
    from zooscope.cli import main
    from zooscope.engine import store as store_module

    point, when = spec.split(":")
    state = {"flush": 0, "final": False}
    cls = store_module.ZooStore
    real_write, real_commit, real_flush, real_close = (store_module._write_all, cls._commit, cls._flush, cls.close)

    def armed() -> bool:
        return state["final"] if when == "final" else state["flush"] == int(when)

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def write_all(writes):
        if armed() and point == "before-write":
            die()
        if armed() and point == "mid-write":
            real_write(writes[: len(writes) // 2])
            die()
        real_write(writes)

    def commit(self, counters, columns):
        if armed() and point == "before-attrs":
            die()
        real_commit(self, counters, columns)
        if armed() and point == "after-attrs":
            die()

    def flush(self):
        state["flush"] += 1
        real_flush(self)

    def close(self):
        state["final"] = True
        real_close(self)

    store_module._write_all = write_all
    cls._commit, cls._flush, cls.close = commit, flush, close
    return main(argv)


# ---------------------------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 trials of each kind on 40 models")
    parser.add_argument("--models", type=int, default=40)
    parser.add_argument("--kills", type=int, default=20, help="kills of each kind (default 20)")
    parser.add_argument("--tiny-models", type=int, default=300, help="models of the commit-point zoo")
    parser.add_argument("--scenarios", default="client,client-local,worker,commit,two-writers,disk-full")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    parser.add_argument("--inject", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.inject:
        return inject_and_run(args.inject, [a for a in rest if a != "--"])
    kills = 3 if args.quick else args.kills
    rng = np.random.default_rng(args.seed)
    random.seed(args.seed)
    chosen = args.scenarios.split(",")
    tallies = []
    with tempfile.TemporaryDirectory(prefix="zooscope-chaos-") as tmp:
        work = Path(tmp)
        zoo = make_zoo(work / "zoo", args.models, (96, 64))
        tiny = make_zoo(work / "tiny", args.tiny_models, (24, 16), seed=1)
        t0 = time.monotonic()
        code, out = finish(start(scan_argv(zoo, work / "ref.zarr", "none")))
        seconds = time.monotonic() - t0
        assert code == 0, out
        ref = snapshot(work / "ref.zarr")
        code, out = finish(start(["scan", str(tiny), "--store", str(work / "tiny-ref.zarr"), "--cluster", "none",
                                  "--no-progress", "--commit-seconds", "1000"]))
        assert code == 0, out
        tiny_ref = snapshot(work / "tiny-ref.zarr")
        print(f"clean scan of {len(ref)} models: {seconds:.1f} s; load {os.getloadavg()[0]:.1f}")
        if "client" in chosen:
            tallies.append(client_kills(zoo, ref, seconds, kills, "none", work, rng))
        if "client-local" in chosen:
            t0 = time.monotonic()
            finish(start(scan_argv(zoo, work / "ref-local.zarr", "local")))
            tallies.append(client_kills(zoo, ref, time.monotonic() - t0, kills, "local", work, rng))
        if "worker" in chosen:
            tallies.append(worker_kills(zoo, ref, max(0.5, seconds / 2), kills, work, rng))
        if "commit" in chosen:
            flushes = -(-args.tiny_models // 64)
            tallies.append(commit_kills(tiny, tiny_ref, max(kills, 2 * len(POINTS)) if not args.quick else
                                        2 * len(POINTS), work, rng, flushes))
        if "two-writers" in chosen:
            tallies.append(two_writers(zoo, ref, max(3, kills // 2), work))
        if "disk-full" in chosen:
            tallies.append(disk_full(zoo, ref, work))
    header = ("| scenario | trials | lost | duplicated | differing | check faults after kill | check faults after "
              "rerun | exit codes | notes |\n|---|---|---|---|---|---|---|---|---|")
    table = "\n".join([header, *(t.row() for t in tallies)])
    notes = (f"{args.models}-model zoo (3 layers of 96x64 each), {args.tiny_models}-model tiny zoo for the commit "
             f"points; clean scan {seconds:.1f} s; load average {os.getloadavg()[0]:.1f}; lost/duplicated/"
             "differing against the clean scan after the rerun")
    if args.record:
        sys.path.insert(0, str(Path(__file__).parent))
        from _results import record

        record("Crash safety: SIGKILL chaos (bench/chaos.py)", table, notes)
    else:
        print(notes)
        print(table)
    bad = sum(t.lost + t.dup + t.diff + t.faults_after_kill + t.faults_after_rerun for t in tallies)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

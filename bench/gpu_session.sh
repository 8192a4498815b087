#!/usr/bin/env bash
# Everything zooscope wants from one 10-minute call on the GPU machine, most important first.
#
# On the device (carry .whl, made by `bash bench/fetch_wheels.sh`):
#     bash bench/gpu_session.sh
# Here, on the CPU, to check the script itself (shrunk sizes, GPU-only parts report "no GPU"; runs in a copy of
# the tree so that bench/RESULTS.md here is left alone):
#     bash bench/gpu_session.sh --cpu-dry-run
# Only some steps (a second call for what the first had no time for):
#     STEPS="e2e sweep scaling" bash bench/gpu_session.sh
#
# Each step has its own time limit and the whole run a deadline (BUDGET seconds, default 540); a step that fails
# does not stop the others, a step with no time left is skipped. Written to $OUT (at most 8 files, the device's
# limit): summary.txt (one line per step), session.log (every step's output), RESULTS.md (bench/RESULTS.md after
# the run), RESULTS.added.md (only the sections this run appended: merge these into bench/RESULTS.md),
# esd_routing.json (the tuned table), svd_bench.csv/.png. Steps, in order:
#   setup     install .whl/*.whl into /tmp/site (SITE); make `zooscope.*` importable (symlink tree, no pip -e needed)
#   env       nvidia-smi, versions of python/torch/cupy/numba/dask/zarr
#   tests     GPU tests: pytest -k "cuda or gpu or cupy" on tests/test_esd.py, test_powerlaw.py, test_sweep.py
#   kernel    CuPy power-law kernel against the Numba kernel on 4,000 random/tied/tiny samples, all modes
#   solver    eigenvalue solvers on the device: CuPy syevd for one matrix, batched Jacobi for stacks (errstate
#             checked), routes and errors against LAPACK, fp16 on the bus, pools after a stack, the local layout
#   svd       zooscope bench svd --tune (GPU-relevant shapes added), table recorded in RESULTS.md
#   fitgpu    power-law fits of all 193 GPT-2-xl-sized ESDs in one launch (target < 50 ms) and bootstrap
#   e2e       GPT-2-xl-shaped fp16 file: read+copy-to-GPU baseline, zooscope analyze (GPU), weightwatcher on
#             the same GPU on a subset of blocks
#   sweep     python bench/sweep.py --device cuda (1,000 width-100 MLPs x 100 epochs)
#   plfit     python bench/plfit.py (CPU kernels on the 16-core machine)
#   vsww      python bench/vs_weightwatcher.py --models effnet0 (real checkpoint carried as a wheel)
#   scaling   python bench/scaling.py: 1/4/16 CPU workers (profile gpus: 0, no worker sees the GPU), then the
#             local layout of this machine (1 GPU worker + 15 CPU workers) and one local-cuda worker
#   racecheck compute-sanitizer racecheck on one small launch of the power-law kernel
set -u

DRY=0
IN_COPY=0
for arg in "$@"; do
  case "$arg" in
    --cpu-dry-run) DRY=1 ;;
    --in-copy) IN_COPY=1 ;;
    *) echo "unknown argument $arg" >&2; exit 2 ;;
  esac
done
ROOT=$(cd "$(dirname "$0")/.." && pwd)
if [ "$DRY" = 1 ] && [ "$IN_COPY" = 0 ]; then
  COPY=/tmp/zooscope-gpu-dry/repo
  rm -rf "$COPY" && mkdir -p "$COPY"
  tar -C "$ROOT" --exclude=./.git --exclude='*.zarr' --exclude=__pycache__ -cf - . | tar -C "$COPY" -xf -
  exec bash "$COPY/bench/gpu_session.sh" --cpu-dry-run --in-copy
fi
cd "$ROOT"

PY=${PY:-python3}
WORK=${WORK:-/tmp/zooscope-gpu-session}
OUT=${OUT:-$WORK/out}
BUDGET=${BUDGET:-540}
STEPS=${STEPS:-"env tests kernel solver svd fitgpu e2e sweep plfit vsww scaling racecheck"}
STEPS="setup ${STEPS#setup }"  # setup always runs first
rm -rf "$WORK/logs" "$WORK/zoo" && mkdir -p "$WORK/logs" "$OUT"
START=$(date +%s)
DEADLINE=$((START + BUDGET))
SUMMARY=$OUT/summary.txt
LOG=$OUT/session.log
: >"$SUMMARY"
: >"$LOG"
cp bench/RESULTS.md "$WORK/RESULTS.before.md"
export PYTHONUNBUFFERED=1 ZOOSCOPE_HOME=$WORK/home MPLBACKEND=Agg
export ZOOSCOPE_DRY=$DRY
SITE=${SITE:-$([ "$DRY" = 1 ] && echo "$WORK/site" || echo /tmp/site)}
export PYTHONPATH=$WORK/zs:$SITE:$ROOT/bench${PYTHONPATH:+:$PYTHONPATH}
export PATH=$SITE/bin:$PATH

want() { [[ " $STEPS " == *" $1 "* ]]; }

# step NAME LIMIT_SECONDS COMMAND...: run with a timeout capped by the deadline; output into the session log
step() {
  local name=$1 limit=$2
  shift 2
  want "$name" || return 0
  local left=$((DEADLINE - $(date +%s)))
  if ((left < 15)); then
    echo "$name: SKIPPED (deadline reached)" | tee -a "$SUMMARY"
    return 0
  fi
  ((limit > left)) && limit=$left
  local t0 rc status
  t0=$(date +%s)
  printf '\n===== %s (limit %ss, t=%ss) =====\n' "$name" "$limit" "$((t0 - START))" >>"$LOG"
  if declare -F "$1" >/dev/null; then  # a function of this script: run it in a child bash that timeout can kill
    timeout -k 5 "$limit" bash -c '"$@"' _ "$@" >"$WORK/logs/$name.log" 2>&1
  else
    timeout -k 5 "$limit" "$@" >"$WORK/logs/$name.log" 2>&1
  fi
  rc=$?
  cat "$WORK/logs/$name.log" >>"$LOG"
  case $rc in
    0) status=ok ;;
    124 | 137) status="TIMEOUT after ${limit}s" ;;
    *) status="FAILED rc=$rc" ;;
  esac
  echo "$name: $status ($(($(date +%s) - t0)) s)" | tee -a "$SUMMARY"
  if ((rc != 0)); then
    grep -v '^WARNING: Location' "$WORK/logs/$name.log" | tail -n 20 | sed "s/^/  [$name] /"
  fi
  return 0
}

if ((DRY)); then
  ARCH_XL=gpt2-small; R50_MODELS=3; R50_WORKERS=1,2; SWEEP_ARGS="--device cpu --networks 16 --epochs 2"
  PLFIT_ARGS="--sizes 1000 4000 --powerlaw-max 1000 --repeats 3"; SVD_SHAPES="9x64x64,1x256x512"
else
  ARCH_XL=gpt2-xl; R50_MODELS=16; R50_WORKERS=1,4,16; SWEEP_ARGS="--device cuda"
  PLFIT_ARGS="--sizes 1000 4000 15000 --powerlaw-max 4000"
  SVD_SHAPES="9x64x64,9x256x256,256x64x64,64x512x512,32x768x768,1x768x768,1x3072x768,1x1600x1600,1x6400x1600,4x1024x1024"
fi

# ---------------------------------------------------------------------------------------------- helper programs
mkdir -p "$WORK/py"
cat >"$WORK/py/setup_check.py" <<'EOF'
import importlib, sys
import zooscope
print("python", sys.version.split()[0], "zooscope from", zooscope.__file__)
for m in ("numpy", "scipy", "numba", "torch", "cupy", "dask", "distributed", "zarr", "numcodecs", "pandas",
          "xarray", "safetensors", "weightwatcher", "powerlaw", "dask_cuda"):
    try:
        mod = importlib.import_module(m)
        print(f"{m:14s} {getattr(mod, '__version__', '?'):12s} {mod.__file__}")
    except Exception as e:  # report, do not stop: the steps that need it will fail on their own
        print(f"{m:14s} MISSING ({type(e).__name__}: {e})")
import zooscope.engine.scan, zooscope.engine.store, zooscope.kernels.esd, zooscope.pipelines.analyze  # noqa
from zooscope.kernels.backends import cupy_available, describe_device, gpu_available, torch_cuda_available
print("gpu_available", gpu_available(), "cupy", cupy_available(), "torch.cuda", torch_cuda_available())
print("device:", describe_device())
EOF

cat >"$WORK/py/solver_check.py" <<'EOF'
"""Eigenvalue solvers on the device: which cuSOLVER path each shape takes, the route recorded, the error against
LAPACK SVD, fp16 crossing the bus, the pools after a stack, and the local cluster layout of this machine."""
import logging, os, time
import numpy as np
import scipy.linalg
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
from _results import record
from zooscope.kernels import esd
from zooscope.kernels.backends import cupy_available, describe_device, device_key, torch_cuda_available, visible_gpus
from zooscope.engine.cluster import available_cores, local_worker_specs

print("device:", describe_device(), "| key:", device_key(), "| visible GPUs:", visible_gpus())
specs = local_worker_specs({}, None, visible_gpus(), available_cores())
print("local layout:", {k: (v["resources"], v["env"]) for k, v in specs.items()})
dry = int(os.environ["ZOOSCOPE_DRY"])
shapes = [(1, 96, 64), (12, 32, 32)] if dry else [(1, 6400, 1600), (1, 2048, 2048), (256, 64, 64), (64, 512, 512)]
backends = [b for b in ("cupy-gram-checked", "cupy-gram-eigh", "torch-gram-checked", "numpy-gram-checked")
            if esd.backend_available(b)]
rng = np.random.default_rng(0)
bad = 0
lines = ["| stack (fp16 in) | backend | ms | max abs err / lambda_max | max rel err | routes |",
         "|---|---|---|---|---|---|"]
for shape in shapes:
    stack = (rng.standard_t(3.0, size=shape) / np.sqrt(shape[1])).astype(np.float16)
    ref = np.sort(np.stack([scipy.linalg.svd(w.astype(np.float64), compute_uv=False) ** 2 for w in stack]), axis=1)
    for b in backends:
        esd.eigenvalues(stack[:1], backend=b)  # warm-up: handles, kernels
        t = time.perf_counter()
        got, routes = esd.eigenvalues_with_routes(stack, backend=b)
        dt = time.perf_counter() - t
        err = float(np.max(np.abs(got - ref) / ref.max(axis=1, keepdims=True)))
        rel = float(np.max(np.abs(got - ref) / np.maximum(ref, 1e-300)))
        ok = err < 1e-10 and (not b.endswith("-checked") or rel < esd.CHECKED_ACCURACY)
        bad += not ok
        print(f"{'x'.join(map(str, shape))} fp16 {b}: {dt * 1e3:.1f} ms, max |dl|/lmax {err:.1e}, max rel {rel:.1e}, "
              f"routes {sorted(set(routes))} {'OK' if ok else 'BAD'}")
        lines.append(f"| {'x'.join(map(str, shape))} | {b} | {dt * 1e3:.1f} | {err:.1e} | {rel:.1e} | "
                     f"{', '.join(sorted(set(routes)))} |")
record("Eigenvalue solvers on the device: solver by shape, recorded routes, fp16 on the bus", "\n".join(lines),
       f"{describe_device()}; one eigenvalues_with_routes call after a warm-up on one matrix; host fp16 stack in, "
       "fp64 out; errors against scipy's LAPACK SVD of the same fp16 values in fp64; CuPy: syevd for one matrix, "
       "batched Jacobi for stacks, both under cupyx.errstate(linalg='raise')")
if cupy_available():
    import cupy
    pool = cupy.get_default_memory_pool()
    print(f"CuPy pool after the stacks: {pool.total_bytes() / 1e6:.1f} MB held, {pool.used_bytes() / 1e6:.1f} MB used")
if torch_cuda_available():
    import torch
    print(f"torch cache: {torch.cuda.memory_reserved() / 1e6:.1f} MB reserved")
raise SystemExit(1 if bad else 0)
EOF

cat >"$WORK/py/kernel_check.py" <<'EOF'
"""CuPy power-law kernel vs the Numba kernel: same xmin index on every sample, alpha/D within 1e-12."""
import os, time
import numpy as np
from zooscope.kernels import powerlaw_numba as nb
from zooscope.kernels.backends import cupy_available

rng = np.random.default_rng(7)
xs = []
for k in range(4000 if not int(os.environ["ZOOSCOPE_DRY"]) else 100):
    kind = k % 5
    n = int(rng.integers(0, 2500)) if k % 50 else int(rng.integers(0, 6))
    if kind == 0:
        x = rng.pareto(rng.uniform(0.5, 3.0), n) + 1.0
    elif kind == 1:
        x = np.round(rng.pareto(1.5, n) + 1.0, 1)          # ties
    elif kind == 2:
        x = rng.lognormal(0.0, 1.5, n)
    elif kind == 3:
        x = np.repeat(rng.pareto(2.0, max(1, n // 4)) + 1.0, 4)[:n]   # every value 4 times
    else:
        x = rng.exponential(1.0, n) + 1e-3
    xs.append(np.sort(x))
offsets = np.zeros(len(xs) + 1, np.int64)
np.cumsum([x.size for x in xs], out=offsets[1:])
values = np.concatenate(xs)
print(f"{len(xs)} samples, {values.size} values")
if not cupy_available():
    print("no CuPy device: only the Numba side ran (dry run)")
    nb.best_of_ragged(values, offsets, False, False, -np.inf, np.inf, 0, 0.0)
    raise SystemExit(0)
from zooscope.kernels import powerlaw_cuda as pc
bad = 0
for args in [(False, False, -np.inf, np.inf, 0, 0.0), (True, False, -np.inf, np.inf, 0, 0.0),
             (False, False, 1.5, 4.0, 20, 0.0), (True, False, 1.5, 4.0, 20, 0.0), (False, True, 2.0, 2.0, 0, 0.0),
             (True, True, 2.0, 2.0, 0, 0.0), (False, False, -np.inf, np.inf, 50, 1.0)]:
    t = time.perf_counter(); c = nb.best_of_ragged(values, offsets, *args); t_nb = time.perf_counter() - t
    pc.best_of_ragged(values, offsets, *args)
    t = time.perf_counter(); g = pc.best_of_ragged(values, offsets, *args); t_gpu = time.perf_counter() - t
    same_i = g[0] == c[0]
    rel_a = np.abs(g[1] - c[1]) / np.abs(c[1])
    ok = same_i.all() and np.array_equal(np.isnan(g[1]), np.isnan(c[1])) and np.nanmax(rel_a, initial=0) <= 1e-12 \
        and np.allclose(g[2], c[2], rtol=1e-12, atol=1e-15, equal_nan=True)
    bitwise = np.array_equal(g[1], c[1], equal_nan=True) and np.array_equal(g[2], c[2], equal_nan=True)
    print(f"{args}: {'OK' if ok else 'MISMATCH'}; xmin index differs on {int((~same_i).sum())}; bitwise "
          f"{bitwise}; max rel dalpha {np.nanmax(rel_a, initial=0):.1e}; numba {t_nb * 1e3:.1f} ms, "
          f"cuda {t_gpu * 1e3:.1f} ms")
    if not ok:
        bad += 1
        for b in np.flatnonzero(~same_i)[:5]:
            print(f"   sample {b} (n={xs[b].size}): cuda {g[0][b]} {g[1][b]!r} {g[2][b]!r}; "
                  f"numba {c[0][b]} {c[1][b]!r} {c[2][b]!r}")
raise SystemExit(1 if bad else 0)
EOF

cat >"$WORK/py/svd_record.py" <<'EOF'
"""Record the `zooscope bench svd --tune` CSV in RESULTS.md (no second measurement)."""
import sys
import pandas as pd
from _results import record
df = pd.read_csv(sys.argv[1])
table = df[["shape", "backend", "precision", "seconds", "speedup", "max_rel_error"]].rename(
    columns={"speedup": "speed-up vs scipy-gesdd", "max_rel_error": "max |Δλ|/λmax"})
record("Eigenvalue backends (zooscope bench svd --tune)", table.to_markdown(index=False, floatfmt=".3g"),
       f"`zooscope bench svd --tune --repeats 2 --shapes {sys.argv[2]}`; median of 2 calls after a warm-up, host "
       "array in/out; Student-t(3) fp32 stacks; routing table saved as esd_routing.json")
EOF

cat >"$WORK/py/fitgpu.py" <<'EOF'
"""All power-law fits of a GPT-2-xl-sized model (192 ESDs of 1600 values + one of 1024) in one GPU launch."""
import os, time
import numpy as np
from plfit import heavy_tailed_esd
from _results import record
from zooscope.kernels import powerlaw as pl
from zooscope.kernels.backends import cupy_available

dry = int(os.environ["ZOOSCOPE_DRY"])
sizes = [1600] * (192 if not dry else 8) + [1024]
xs = [heavy_tailed_esd(n, seed=k) for k, n in enumerate(sizes)]
backends = ["numba"] + (["cuda"] if cupy_available() else [])

def best(fn, reps):
    t_best = float("inf")
    for _ in range(reps):
        t = time.perf_counter(); out = fn(); t_best = min(t_best, time.perf_counter() - t)
    return t_best, out

rows, fits = [], {}
for b in backends:
    pl.fit_many(xs[:4], backend=b)  # compile / load
    t, fits[b] = best(lambda: pl.fit_many(xs, backend=b), 5)
    rows.append((f"fit_many, {len(xs)} ESDs", b, t))
x = xs[0]
for b in backends:
    pl.fit(x, backend=b, bootstrap=10, seed=0)
    t, _ = best(lambda: pl.fit(x, backend=b, bootstrap=1000, seed=0), 2)
    rows.append(("fit, n=1600, bootstrap=1000", b, t))
dalpha = max(abs(a.alpha - c.alpha) for a, c in zip(fits["numba"], fits.get("cuda", fits["numba"])))
base = {r[0]: r[2] for r in rows if r[1] == "numba"}
lines = ["| what | backend | ms | speed-up vs numba |", "|---|---|---|---|"]
lines += [f"| {w} | {b} | {t * 1e3:.2f} | {base[w] / t:.1f}x |" for w, b, t in rows]
record("Power-law fits of a GPT-2-xl-sized model: Numba (all cores) vs one CUDA launch",
       "\n".join(lines),
       f"heavy-tailed pooled ESDs as bench/plfit.py; best of 5 (fit_many) / 2 (bootstrap) after warm-up; "
       f"max |alpha_cuda - alpha_numba| = {dalpha:.1e}; target: all layers of GPT-2-xl < 50 ms on the GPU")
EOF

cat >"$WORK/py/e2e.py" <<'EOF'
"""End to end on one GPT-2-xl-shaped fp16 safetensors file: zooscope on the GPU against reading the file's bytes
and copying them to the GPU, and against weightwatcher 0.7.7 on the same GPU (on the first blocks only)."""
import logging, os, sys, time
import numpy as np
import torch
from _results import record
import zooscope
from zooscope.engine.tune import load_table
from zooscope.kernels.backends import cupy_available

path, warm, table_path = sys.argv[1], sys.argv[2], sys.argv[3]
gpu = torch.cuda.is_available()
dev = "cuda" if gpu else "cpu"
fit_backend = "cuda" if cupy_available() else "numba"
blocks = 1 if int(os.environ["ZOOSCOPE_DRY"]) else 8

def sync():
    if gpu:
        torch.cuda.synchronize()

def timed(fn):
    sync(); t = time.perf_counter(); out = fn(); sync(); return time.perf_counter() - t, out

def read_to_device():
    from safetensors import safe_open
    with safe_open(path, framework="pt", device="cpu") as f:
        return sum(f.get_tensor(k).to(dev).numel() for k in f.keys())

size = os.path.getsize(path)
read_to_device()  # page cache warm for both sides (the file was just written; say so in the notes)
t_read, n_el = timed(read_to_device)
print(f"read + copy to {dev}: {t_read:.2f} s for {size / 1e9:.2f} GB", flush=True)

zooscope.analyze(warm, fit_backend=fit_backend)  # CUDA context, cuBLAS/cuSOLVER handles, Numba/CuPy compiles
rows = []
t_auto, df = timed(lambda: zooscope.analyze(path, fit_backend=fit_backend))
print(f"zooscope analyze (built-in auto routing, fit {fit_backend}): {t_auto:.2f} s, {len(df)} layers", flush=True)
rows.append(("zooscope analyze, built-in auto routing", len(df), t_auto))
table = load_table(table_path) if os.path.exists(table_path) else None
if table is not None:
    t_tuned, df2 = timed(lambda: zooscope.analyze(path, fit_backend=fit_backend, esd_table=table))
    rows.append(("zooscope analyze, tuned routing table", len(df2), t_tuned))
    print(f"tuned: {t_tuned:.2f} s; max |dalpha| vs built-in {np.nanmax(np.abs(df2.alpha - df.alpha)):.1e}",
          flush=True)
print(df.groupby("esd_backend").size() if "esd_backend" in df else "", flush=True)

# weightwatcher on the same GPU, on the first `blocks` transformer blocks (all of GPT-2-xl would take minutes)
from safetensors.torch import load_file
logging.getLogger("weightwatcher").setLevel(logging.ERROR)
import weightwatcher as ww
keep = tuple(f"h.{i}." for i in range(blocks))
state = {k: v.float() for k, v in load_file(path).items() if k.startswith(keep) and v.ndim == 2}
t_ww, theirs = timed(lambda: ww.WeightWatcher(model=state).analyze())
t_zs, ours = timed(lambda: zooscope.analyze(state, fit_backend=fit_backend, ww_version="0.7.7"))
common = ours.set_index("longname").index.intersection(theirs.set_index("longname").index)
da = np.abs(ours.set_index("longname").loc[common, "alpha"] - theirs.set_index("longname").loc[common, "alpha"])
print(f"weightwatcher {t_ww:.2f} s vs zooscope {t_zs:.2f} s on {len(common)} layers; max |dalpha| {da.max():.1e}")
rows.append((f"weightwatcher 0.7.7 (state dict, first {blocks} blocks)", len(theirs), t_ww))
rows.append((f"zooscope analyze (same state dict)", len(ours), t_zs))
lines = ["| run | layers | seconds | vs read+copy | layers/s |", "|---|---|---|---|---|",
         f"| read file + copy every tensor to {dev} (safetensors) | - | {t_read:.2f} | 1.00x | - |"]
lines += [f"| {r} | {n} | {t:.2f} | {t / t_read:.2f}x | {n / t:.1f} |" for r, n, t in rows]
record(f"End to end on one {os.path.basename(path)} ({size / 1e9:.2f} GB fp16): zooscope on {dev} vs read+copy and "
       "weightwatcher", "\n".join(lines),
       f"fit_backend={fit_backend}; page cache warm (file just written); zooscope warmed up on a small model "
       f"first; weightwatcher on the same machine/GPU ({'torch CUDA' if gpu else 'CPU'}) gets the first {blocks} "
       f"blocks as an fp32 state dict, zooscope the same dict: speed-up {t_ww / t_zs:.1f}x, max |dalpha| "
       f"{da.max():.1e} over {len(common)} common layers; targets: whole file <= 2x read+copy, >= 20x ww")
EOF

# ---------------------------------------------------------------------------------------------------- steps
setup() {
  rm -rf "$SITE"  # never a stale install from another run or Python
  if ls .whl/*.whl >/dev/null 2>&1; then
    if "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        .whl/*.whl || return 1
    else
      echo "python is not 3.12: carried cp312 wheels not installed (dry run uses this machine's packages)"
    fi
  else
    echo "no .whl/ folder: nothing to install (run bench/fetch_wheels.sh here and carry .whl)"
  fi
  # `zooscope.*` without pip -e: setup.py maps engine/ kernels/ pipelines/ into zooscope/; mirror that mapping
  rm -rf "$WORK/zs" && mkdir -p "$WORK/zs/zooscope"
  for f in zooscope/*; do ln -sfn "$ROOT/$f" "$WORK/zs/zooscope/"; done
  for d in engine kernels pipelines; do ln -sfn "$ROOT/$d" "$WORK/zs/zooscope/$d"; done
  (cd /tmp && "$PY" "$WORK/py/setup_check.py")
}

env_info() {
  nvidia-smi || echo "(no nvidia-smi)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
  nproc; free -g | head -2; df -h /tmp | tail -1
  "$PY" -c "import torch; print('torch', torch.__version__, torch.version.cuda, torch.cuda.is_available())"
}

make_zoos() {  # background: the big synthetic files, while the GPU tests run
  mkdir -p "$WORK/zoo"
  if want e2e; then
    "$PY" bench/make_zoo.py --arch mlp --n-models 1 --out "$WORK/zoo/warm" >"$WORK/logs/make_xl.log" 2>&1
    nice -n 5 "$PY" bench/make_zoo.py --arch "$ARCH_XL" --n-models 1 --out "$WORK/zoo/xl" --dtype fp16 \
      >>"$WORK/logs/make_xl.log" 2>&1 && touch "$WORK/zoo/xl.done"
  fi
  if want scaling; then
    nice -n 5 "$PY" bench/make_zoo.py --arch resnet50 --n-models "$R50_MODELS" --out "$WORK/zoo/r50" \
      >"$WORK/logs/make_r50.log" 2>&1 && touch "$WORK/zoo/r50.done"
  fi
}

wait_for() {  # wait_for FILE SECONDS
  local i
  for ((i = 0; i < $2; i++)); do [ -e "$1" ] && return 0; sleep 1; done
  echo "timed out waiting for $1"; cat "$WORK"/logs/make_*.log; return 1
}

e2e() {
  wait_for "$WORK/zoo/xl.done" 300 || return 1
  cat "$WORK/logs/make_xl.log"
  "$PY" "$WORK/py/e2e.py" "$WORK/zoo/xl/$ARCH_XL-000.safetensors" "$WORK/zoo/warm/mlp-000.safetensors" \
    "$OUT/esd_routing.json"
}

svd() {
  "$PY" -m zooscope bench svd --tune --repeats 2 --shapes "$SVD_SHAPES" --out "$WORK/svd" \
    --table "$OUT/esd_routing.json" || return 1
  cp "$WORK/svd/svd_bench.csv" "$WORK/svd/svd_bench.png" "$OUT/" 2>/dev/null
  "$PY" "$WORK/py/svd_record.py" "$WORK/svd/svd_bench.csv" "$SVD_SHAPES"
}

scaling() {
  wait_for "$WORK/zoo/r50.done" 200 || return 1
  local rc=0
  "$PY" bench/scaling.py --n-models "$R50_MODELS" --workers "$R50_WORKERS" --zoo "$WORK/zoo/r50" || rc=$?
  if ! ((DRY)); then
    "$PY" bench/scaling.py --n-models "$R50_MODELS" --workers 16 --gpu --zoo "$WORK/zoo/r50" || rc=$?
  fi
  return $rc
}

racecheck() {
  command -v compute-sanitizer >/dev/null || { echo "no compute-sanitizer"; return 0; }
  compute-sanitizer --tool racecheck --racecheck-report hazard "$PY" -c "
import numpy as np
from zooscope.kernels import powerlaw_cuda as pc
rng = np.random.default_rng(0)
xs = [np.sort(rng.pareto(1.5, n) + 1) for n in (300, 700, 5)]
off = np.cumsum([0] + [x.size for x in xs])
print(pc.best_of_ragged(np.concatenate(xs), off, False, False, -np.inf, np.inf, 0, 0.0))"
}

# -------------------------------------------------------------------------------------------------- run them
export PY WORK OUT ROOT SITE DRY STEPS ARCH_XL R50_MODELS R50_WORKERS SVD_SHAPES
export -f want wait_for setup env_info e2e svd scaling racecheck
echo "gpu_session: dry=$DRY root=$ROOT out=$OUT budget=${BUDGET}s steps: $STEPS" | tee -a "$SUMMARY"
step setup 90 setup
if want e2e || want scaling; then
  make_zoos &
  ZOO_PID=$!
fi
step env 30 env_info
step tests 180 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_esd.py tests/test_powerlaw.py \
  tests/test_sweep.py tests/test_gpu_paths.py tests/test_cluster.py -k "cuda or gpu or cupy or local"
step kernel 90 "$PY" "$WORK/py/kernel_check.py"
step solver 60 "$PY" "$WORK/py/solver_check.py"
step svd 170 svd
step fitgpu 90 "$PY" "$WORK/py/fitgpu.py"
step e2e 240 e2e
step sweep 150 "$PY" bench/sweep.py $SWEEP_ARGS
step plfit 100 "$PY" bench/plfit.py $PLFIT_ARGS
step vsww 90 "$PY" bench/vs_weightwatcher.py --models effnet0 --repeats 1
step scaling 240 scaling
step racecheck 60 racecheck
[ -n "${ZOO_PID:-}" ] && kill "$ZOO_PID" 2>/dev/null

# ------------------------------------------------------------------------------------------------- results
cp bench/RESULTS.md "$OUT/RESULTS.md"
"$PY" - "$WORK/RESULTS.before.md" bench/RESULTS.md "$OUT/RESULTS.added.md" <<'EOF'
import sys
before, after = (open(p, encoding="utf-8").read() for p in sys.argv[1:3])
new = after[len(before):] if after.startswith(before) else after
open(sys.argv[3], "w", encoding="utf-8").write(new)
EOF
echo "total $(($(date +%s) - START)) s" | tee -a "$SUMMARY"
echo "----- sections appended to bench/RESULTS.md (also in \$OUT/RESULTS.added.md) -----"
cat "$OUT/RESULTS.added.md"
echo "----- summary -----"
cat "$SUMMARY"

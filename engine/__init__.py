"""Orchestration: Dask clusters, plans, runs and the Zarr store. Imports pipelines and kernels."""

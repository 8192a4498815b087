"""Files -> arrays -> tables, and tables -> regressions, plots, reports. Imports kernels only."""

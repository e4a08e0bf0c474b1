"""Hand-written kernels for paths where XLA's own lowering leaves speed on the table (CPU decode projections)."""

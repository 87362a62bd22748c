"""Developer tools, not installed with fastlt: :mod:`tools.kernel_report` (registers, spills and SASS counts of the
kernels as the launchers launch them, compiled for sm_90 without a GPU)."""

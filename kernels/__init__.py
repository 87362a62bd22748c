"""Triton kernels and their launchers (installed as ``fastlt.kernels``).

- :mod:`.philox_noise`: GCL's half-normal noise generated in-kernel from (seed, row, column).
- :mod:`.row_operator`: the SPEC 2.4 row operator: forward (online LSE, optional split rows,
  optional LADE column statistics, optional gradient-in-forward), gradient, combine, rescale.
- :mod:`.launch`: shape heuristics and the Python launchers the autograd Functions call.
"""

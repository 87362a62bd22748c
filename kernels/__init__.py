"""Triton kernels and their launchers (installed as ``fastlt.kernels``; docs/design.md, "Kernels").

- :mod:`.adjusted_ce`: the adjusted cross-entropy's row kernels (forward with optional split rows, LADE's column
  statistics and gradient-in-forward; combine; recompute gradient) and their argument groups;
- :mod:`.reduce`: batch reductions (in a launch of their own, or by a row kernel's last program) and the gradients'
  rescale;
- :mod:`.lade`: LADE's column statistics finished into LADER and its gradient term;
- :mod:`.philox_noise`: GCL's half-normal noise from (seed, row, column);
- :mod:`.row_normalize`: the cosine heads' row L2 normalisation;
- :mod:`.numerics`: shared numerics;
- :mod:`.tiles` (tile shapes and launch policy), :mod:`.counters` (the fused reductions' counters) and
  :mod:`.launch` (the launchers the autograd glue calls).
"""

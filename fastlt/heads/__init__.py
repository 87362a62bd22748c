"""Fused linear and cosine classifier heads: features in, loss out, never the (N, C) logits (docs/design.md,
"Fused heads").

A head replaces ``nn.Linear`` (or a cosine classifier) plus a long-tail loss. The package, bottom to top:

- :mod:`.plan`: how the (N, C) logits are cut into row or class chunks (shape arithmetic, no Triton);
- :mod:`.passes`: the chunked passes (cuBLAS matmuls plus the adjusted cross-entropy's row kernel);
- :mod:`.lade`: LADE's two passes;
- :mod:`.glue`: the autograd Functions and ``torch.library`` custom ops over the passes, and the Triton path's entry;
- :mod:`.functional`: :func:`linear_cross_entropy`, :func:`cosine_cross_entropy`, :func:`lade_linear_loss`;
- :mod:`.modules`: :class:`LinearLossHead`, :class:`CosineGCLHead`.

Only :mod:`.functional` and the modules' direct calls reach the Triton path (lazy imports of :mod:`.glue`), so the
package imports without Triton. The
oracles (:func:`reference_linear_cross_entropy`, ...) live in :mod:`fastlt.reference` with every other definition.
"""

from ..reference import reference_cosine_cross_entropy, reference_lade_linear_loss, reference_linear_cross_entropy
from .functional import cosine_cross_entropy, lade_linear_loss, linear_cross_entropy
from .modules import CosineGCLHead, LinearLossHead
from .plan import CHUNK_BYTES, default_chunk_classes, default_chunk_rows, head_chunk_rows

__all__ = [
    "linear_cross_entropy",
    "cosine_cross_entropy",
    "lade_linear_loss",
    "reference_linear_cross_entropy",
    "reference_cosine_cross_entropy",
    "reference_lade_linear_loss",
    "LinearLossHead",
    "CosineGCLHead",
    "CHUNK_BYTES",
    "default_chunk_rows",
    "default_chunk_classes",
    "head_chunk_rows",
]

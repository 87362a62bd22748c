"""LADE on a linear head (moved to :mod:`fastlt.heads`: :func:`fastlt.heads.lade_linear_loss`, its passes in
:mod:`fastlt.heads.lade`, its oracle :func:`fastlt.reference.reference_lade_linear_loss`). This module re-exports
the public names for code written against it; it will be removed in a later release."""

from .heads import lade_linear_loss, reference_lade_linear_loss

__all__ = ["lade_linear_loss", "reference_lade_linear_loss"]

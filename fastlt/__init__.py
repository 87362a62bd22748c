"""fastlt: fused GPU losses for long-tailed classification.

Modules: :class:`LogitAdjustedLoss`, :class:`BalancedSoftmaxLoss`, :class:`LDAMLoss`, :class:`GCLLoss`,
:class:`LADELoss`, :class:`CosineClassifier`; fused heads (features in, no (N, C) logits)
:class:`LinearLossHead`, :class:`CosineGCLHead`. Submodules: ``functional`` (the same as functions,
``backend=`` switch), ``reference`` (the pure-PyTorch oracle), ``priors``, ``noise``, ``posthoc``,
``data``, ``metrics``, ``heads`` (the fused heads' functions and modules; ``lade_head`` re-exports its LADE
head for code written against it) and ``distributed`` (data parallel: ``dp_group=``). The design: docs/design.md.
"""



def _kernels_of_a_source_tree() -> None:
    """In a source checkout that is not the installed package (``pip install .``, then Python or pytest inside the
    checkout: its ``fastlt/`` shadows the installed one, and ``kernels/`` beside it is ``fastlt.kernels`` only once
    installed, ``[tool.setuptools.package-dir]``), ``fastlt.kernels`` is that ``kernels/`` folder."""
    import importlib.util
    import os
    import sys

    name = __name__ + ".kernels"
    if importlib.util.find_spec(name) is not None:
        return
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
    init = os.path.join(folder, "__init__.py")
    if os.path.isfile(init):
        spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[folder])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)


_kernels_of_a_source_tree()

from . import data, distributed, functional, heads, lade_head, metrics, noise, posthoc, priors, reference  # noqa: E402
from .cosine import CosineClassifier  # noqa: E402
from .heads import CosineGCLHead, LinearLossHead  # noqa: E402
from .losses import BalancedSoftmaxLoss, GCLLoss, LADELoss, LDAMLoss, LogitAdjustedLoss  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "LogitAdjustedLoss",
    "BalancedSoftmaxLoss",
    "LDAMLoss",
    "GCLLoss",
    "LADELoss",
    "CosineClassifier",
    "LinearLossHead",
    "CosineGCLHead",
    "heads",
    "lade_head",
    "functional",
    "reference",
    "priors",
    "noise",
    "posthoc",
    "data",
    "metrics",
    "distributed",
]

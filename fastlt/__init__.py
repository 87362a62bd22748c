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
    installed, ``[tool.setuptools.package-dir]``; or a second checkout beside an editable install, whose finder
    maps ``fastlt.kernels`` to the first), ``fastlt.kernels`` is this checkout's ``kernels/`` folder. A checkout:
    ``pyproject.toml`` and ``kernels/launch.py`` beside this ``fastlt/`` (an installed package has neither)."""
    import importlib.util
    import os
    import sys

    name = __name__ + ".kernels"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    folder = os.path.join(root, "kernels")
    init = os.path.join(folder, "__init__.py")
    if not (os.path.isfile(os.path.join(root, "pyproject.toml")) and os.path.isfile(os.path.join(folder, "launch.py"))):
        return
    found = importlib.util.find_spec(name)
    if found is None or os.path.dirname(os.path.realpath(found.origin)) != os.path.realpath(folder):
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

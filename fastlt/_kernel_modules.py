"""The kernel modules as the glue imports them: at once where Triton imports (as a plain import), and where it does
not (``pyproject.toml`` asks for it on Linux only) as modules loaded at their first use, so that ``import fastlt``
and the reference path work there; ``backend='triton'`` then raises :func:`fastlt._backend.use_triton`'s error
before any kernel module is touched."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types


def kernel_module(name: str) -> types.ModuleType:
    """The module ``name`` (absolute, under ``fastlt.kernels``): imported, or where Triton is missing executed at
    its first attribute access (``importlib.util.LazyLoader``), which raises Triton's ImportError then."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return _lazy(name)
    return importlib.import_module(name)


def _lazy(name: str) -> types.ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    parent, _, child = name.rpartition(".")
    importlib.import_module(parent)  # (fastlt.kernels' __init__ imports nothing)
    spec = importlib.util.find_spec(name)
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    setattr(sys.modules[parent], child, module)
    return module

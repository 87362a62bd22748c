"""The kernel modules as the glue imports them: a plain import where Triton imports, and where it does not
(``pyproject.toml`` asks for it on Linux only) a stand-in that raises Triton's ImportError at its first use, so that
``import fastlt`` and the reference path work there; ``backend='triton'`` raises :func:`fastlt._backend.use_triton`'s
error before any kernel is reached."""

from __future__ import annotations

import importlib
import types


class MissingKernels:
    """Stands for kernel module ``name`` where Triton is not importable: any attribute raises the ImportError. Not
    a module and not in ``sys.modules`` (what walks ``sys.modules``, as ``inspect`` does, never touches it)."""

    def __init__(self, name: str, error: ImportError):
        self._name, self._error = name, error

    def __getattr__(self, attr: str):
        if attr.startswith("_"):  # introspection (hasattr of dunders: inspect, doctest, copy) finds nothing
            raise AttributeError(attr)
        raise ImportError(f"{self._name}.{attr} needs the triton package ({self._error}); backend='torch' runs "
                          f"without it") from self._error


def kernel_module(name: str) -> types.ModuleType | MissingKernels:
    """The module ``name`` (absolute, under ``fastlt.kernels``), or where Triton is missing a
    :class:`MissingKernels`."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return MissingKernels(name, exc)
    return importlib.import_module(name)

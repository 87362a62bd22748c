"""The adjusted cross-entropy operator's parameters, declared once (docs/design.md, "The operator").

Every logits-input loss of fastlt is one operator on (N, C) logits ``z`` and (N,) targets ``y``::

    a_ij   = s * (z_ij + tau * log_prior_j - noise_mul * cloud_j * e_ij - m_i * [j == y_i])
    loss_i = focal_i * ((1 - eps) * w_{y_i} * (LSE_j a_ij - a_{i,y_i}) + eps/C * sum_j w_j (LSE_j a_ij - a_ij))

:class:`AdjustedCEArgs` declares its parameters, each with its kind, default and meaning. Everything else is derived
from that declaration by field name: the argument checks of both backends (:func:`check_operator_args`), the
kernels' argument bundle (:meth:`AdjustedCEArgs.from_fields`), and the ``torch.library`` schemas of the custom ops
with their flatten / unflatten (:func:`op_schema`, :func:`flatten`, :func:`unflatten`), which also serve the other
declared groups (LADE's :class:`LadeArgs`, the heads' :class:`ChunkPlan` and :class:`Needs`). Adding a parameter to
the operator is adding a field here (and its use in the kernel and the reference). Importable without Triton.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from . import _validation as V
from .noise import draw_seed, graph_seed

__all__ = [
    "AdjustedCEArgs",
    "LadeArgs",
    "ChunkPlan",
    "Needs",
    "check_operator_args",
    "check_rows",
    "ArgsCache",
    "check_lade_args",
    "op_schema",
    "flatten",
    "unflatten",
    "la_fields",
    "ldam_fields",
    "gcl_fields",
]


# --- kinds: how a declared parameter is checked and how it crosses a torch.library schema -------------------------

class Kind:
    """A parameter kind. ``slots``: ``(suffix, schema type)`` of each value the parameter takes in a flat argument
    list (a custom op's schema); most kinds take one slot named as the parameter."""

    slots: tuple[tuple[str, str], ...] = (("", "Tensor?"),)
    none_ok = False  # None is a value of this kind (checked by its absence)

    def check(self, name: str, value, spec: Param, num_classes: int, device) -> None:
        """Raise ``TypeError``/``ValueError`` naming ``name`` when ``value`` is not of this kind."""

    def convert(self, value):
        """A checked value as the kernels take it."""
        return value

    def to_flat(self, value) -> tuple:
        return (value,)

    def from_flat(self, values: tuple):
        return values[0]


class _Vector(Kind):
    """A (C,) floating tensor on the logits' device (per-class quantities), or None where ``optional``."""

    def __init__(self, optional: bool = True, values: str = V.FINITE):
        self.none_ok = optional
        self.values = values  # what its values must be (V.check_class_vector)
        self.slots = (("", "Tensor?" if optional else "Tensor"),)

    def check(self, name, value, spec, num_classes, device):
        V.check_class_vector(name, value, num_classes, device, self.values)

    def convert(self, value):
        return as_f32(value)


class _Float(Kind):
    """A finite Python real (runtime in the kernels, never constexpr: users schedule them)."""

    slots = (("", "float"),)

    def check(self, name, value, spec, num_classes, device):
        V.check_finite_float(name, value, min_value=spec.low, max_value=spec.high)

    def convert(self, value):
        return float(value)


class _Int(Kind):
    """A Python or numpy integer (not a bool), taken as a Python int."""

    def __init__(self, optional: bool = False):
        self.none_ok = optional
        self.slots = (("", "int?" if optional else "int"),)

    def check(self, name, value, spec, num_classes, device):
        value = V.check_int64(name, value)
        if spec.low is not None and value < spec.low:
            raise ValueError(f"{name} must be >= {spec.low:g}, got {value}")

    def convert(self, value):
        return None if value is None else int(value)


class _Bool(Kind):
    slots = (("", "bool"),)


class _Choice(Kind):
    slots = (("", "str"),)

    def __init__(self, choices: tuple[str, ...]):
        self.choices = choices

    def check(self, name, value, spec, num_classes, device):
        V.check_choice(name, value, self.choices)


class _Margin(Kind):
    """A target margin: None (off), a float for every row, or a (C,) tensor looked up by the target class. Two slots:
    the (C,) tensor and the float."""

    slots = (("_classes", "Tensor?"), ("_value", "float?"))
    none_ok = True

    def check(self, name, value, spec, num_classes, device):
        if isinstance(value, Tensor):
            V.check_class_vector(name, value, num_classes, device, V.FINITE)
        else:
            V.check_finite_float(name, value)

    def convert(self, value):
        return as_f32(value) if isinstance(value, Tensor) else (None if value is None else float(value))

    def to_flat(self, value) -> tuple:
        return (value, None) if isinstance(value, Tensor) else (None, value)

    def from_flat(self, values: tuple):
        return values[0] if values[0] is not None else values[1]


class _Seed(Kind):
    """The noise seed: an int in [0, 2^63) (the 64-bit Philox key), or a one-element int64 tensor on the logits'
    device that the kernels read there (a CUDA graph replays the load, not a baked-in value); None at the public API
    (one is drawn). Two slots: the int and the tensor."""

    slots = (("", "int"), ("_tensor", "Tensor?"))
    none_ok = True

    def check(self, name, value, spec, num_classes, device):
        V.check_seed(name, value, device)

    def convert(self, value):
        return value.reshape(1).contiguous() if isinstance(value, Tensor) else None if value is None else int(value)

    def to_flat(self, value) -> tuple:
        return (0, value) if isinstance(value, Tensor) else (value, None)

    def from_flat(self, values: tuple):
        return values[1] if values[1] is not None else values[0]


VECTOR = _Vector()
LOG_PRIOR_VECTOR = _Vector(values=V.LOG_PRIOR)
PRIOR_VECTOR = _Vector(optional=False, values=V.PRIOR)
FLOAT = _Float()
INT = _Int()
OPTIONAL_INT = _Int(optional=True)
BOOL = _Bool()
MARGIN = _Margin()
SEED = _Seed()


@dataclass(frozen=True)
class Param:
    """A declared parameter: its kind, its meaning (one line, for docs and errors) and inclusive bounds."""

    kind: Kind
    meaning: str
    low: float | None = None
    high: float | None = None


def param(default, kind: Kind, meaning: str, *, low: float | None = None, high: float | None = None):
    """A dataclass field declaring one parameter (see :class:`Param`)."""
    return field(default=default, metadata={"param": Param(kind, meaning, low, high)})


def declared(cls):
    """Class decorator of a declared group (after ``@dataclass``): its ``(name, Param)`` pairs, in declaration order,
    become the tuple ``cls.__params__`` (a plain attribute, which ``torch.compile`` traces), and its
    ``(name, check, Param, None allowed)`` and ``(name, convert)`` the tuples ``__checks__`` and ``__converts__``
    (bound once: they run on every call of a loss)."""
    cls.__params__ = tuple((f.name, f.metadata["param"]) for f in dataclasses.fields(cls))
    cls.__checks__ = tuple((name, spec.kind.check, spec, spec.kind.none_ok) for name, spec in cls.__params__)
    cls.__converts__ = tuple((name, spec.kind.convert) for name, spec in cls.__params__)
    return cls


def params(group) -> tuple[tuple[str, Param], ...]:
    """``(name, Param)`` of a declared group (class or instance), in declaration order."""
    return group.__params__


# --- the operator ---------------------------------------------------------------------------------------------------

REDUCTIONS = ("mean", "sum", "none")


@declared
@dataclass(frozen=True)
class AdjustedCEArgs:
    """The parameters of the adjusted cross-entropy operator, as the kernels take them: tensors are (C,) fp32 and live
    on the logits' device; scalars are Python numbers. Build it with :meth:`from_fields` (checked, converted)."""

    log_prior: Tensor | None = param(None, LOG_PRIOR_VECTOR,
                                     "(C,) log pi_j of the training prior; the offset is tau * log_prior")
    tau: float = param(1.0, FLOAT, "the weight of the prior offset")
    cloud: Tensor | None = param(None, VECTOR, "(C,) GCL cloud sizes delta_j / max(delta), times noise_mul")
    noise_mul: float = param(0.0, FLOAT, "the scale of GCL's noise (0: no noise)")
    margin: float | Tensor | None = param(None, MARGIN, "the target margin m_i: a float, or (C,) looked up by y_i")
    scale: float = param(1.0, FLOAT, "s, the scale of the adjusted logits")
    gamma: float = param(0.0, FLOAT, "the focal exponent (1 - p_{i,y_i})^gamma, p detached", low=0.0)
    label_smoothing: float = param(0.0, FLOAT, "eps, as F.cross_entropy's", low=0.0, high=1.0)
    weight: Tensor | None = param(None, VECTOR, "(C,) class weights w_j, as F.cross_entropy's")
    ignore_index: int = param(-100, INT, "the target of rows that count nowhere")
    reduction: str = param("mean", _Choice(REDUCTIONS), "'mean' (over sum_i w_{y_i}), 'sum' or 'none'")
    seed: int | Tensor = param(0, SEED, "GCL's noise seed: an int, or a (1,) int64 tensor on the device")
    noise_row_offset: int = param(0, INT, "the global index of row 0 (chunked callers): noise is f(seed, row, col)")
    row_scale: float = param(1.0, FLOAT, "class-probability targets: every row's loss and gradient times this (their "
                             "'mean' runs as 'sum' with 1 / N: fastlt._glue.soft_mean)")

    @property
    def has_log_prior(self) -> bool:
        """The offset ``tau * log_prior`` is on: tau = 0 turns it off, so that a log prior with -inf (a class of
        prior 0) adds nothing rather than 0 * -inf = NaN (the reference's rule too)."""
        return self.log_prior is not None and self.tau != 0.0

    @property
    def has_noise(self) -> bool:
        return self.cloud is not None and self.noise_mul != 0.0

    @property
    def seed_from_device(self) -> bool:
        """The kernels read the seed from the (1,) tensor ``seed`` rather than take it as an int."""
        return self.has_noise and isinstance(self.seed, Tensor)

    @property
    def margin_mode(self) -> int:
        """0: no margin; 1: one float for every row; 2: a (C,) tensor looked up by the target."""
        return 0 if self.margin is None else (2 if isinstance(self.margin, Tensor) else 1)

    @property
    def margin_vector(self) -> Tensor | None:
        return self.margin if isinstance(self.margin, Tensor) else None

    @property
    def margin_value(self) -> float:
        return self.margin if isinstance(self.margin, float) else 0.0

    @property
    def seed_value(self) -> int:
        return 0 if isinstance(self.seed, Tensor) else self.seed

    @functools.cached_property
    def memo(self) -> dict:
        """Values derived from these arguments once and shared by every launch that takes them: the kernels' argument
        groups by device (:func:`fastlt.kernels.launch.kernel_groups`) and the launch plans (``"plans"``)."""
        return {}

    @property
    def weight_total(self) -> Tensor:
        """(1,) fp32 ``sum_j w_j`` of the class weights (once per args, in :attr:`memo`: the forward and the backward
        share it). While compiling it is an op of the graph: a cached_property takes an RLock, which Dynamo cannot
        enter (the class-sharded kernels' path with class weights failed to compile)."""
        if torch.compiler.is_compiling():
            return self.weight.to(torch.float32).sum().reshape(1)
        total = self.memo.get("weight_total")
        if total is None:
            total = self.memo["weight_total"] = self.weight.to(torch.float32).sum().reshape(1)
        return total

    @classmethod
    def from_fields(cls, device, fields: dict) -> AdjustedCEArgs:
        """The kernels' arguments from checked public ones (:func:`check_operator_args`), by name: class tensors as
        contiguous fp32, scalars as Python numbers, ``margin`` a float or a (C,) tensor, ``seed`` an int or a (1,)
        int64 tensor on ``device``. When the noise is on and ``seed`` is None, one is drawn from torch's CPU generator
        (the reference path draws the same one); under ``torch.compile`` it is drawn on ``device`` by an op of the
        graph instead, so each call of the compiled graph gets a fresh one (a host int would break the graph, or be
        baked into it), and a given int becomes a tensor of the graph likewise."""
        out = {name: convert(fields[name]) for name, convert in cls.__converts__ if name in fields}
        seed = out.get("seed")
        noise = out.get("cloud") is not None and out.get("noise_mul", 0.0) != 0.0
        if seed is None and not noise:
            out["seed"] = 0
        elif noise and torch.compiler.is_compiling() and not isinstance(seed, Tensor):  # drawn, or an int: a
            out["seed"] = graph_seed(seed, device).reshape(1)  # tensor of the graph (noise.graph_seed)
        elif seed is None:
            out["seed"] = draw_seed()
        return cls(**out)

    @classmethod
    def from_kwargs(cls, device, **fields) -> AdjustedCEArgs:
        """:meth:`from_fields` with the fields as keywords."""
        return cls.from_fields(device, fields)


class ArgsCache:
    """The :class:`AdjustedCEArgs` of the last call, or of the last ``size`` calls (or whatever a caller stores:
    LADE's pair of arguments), reused (its fields' checks, conversions and the kernels' argument groups and launch
    plans in its ``memo`` with it) while a call passes the same fields: the same tensor objects, unchanged
    (``_version``), and equal scalars, for logits of the same class count on the same device. A loss module passes
    its own buffers every step, so its steps after the first skip that work. An entry holds the fields' objects, so
    no tensor id is reused while it is cached. A drawn seed (``seed=None`` with the noise on) stays the one drawn
    when the entry was made: the caller draws a fresh one for every other call and passes it to the launches beside
    these arguments (:func:`fastlt._glue.adjusted_cross_entropy_triton`)."""

    def __init__(self, size: int = 1):
        # the entries, the most recently used first, each one tuple (key, the fields' values, the fields dict, the
        # stored value, the fields' tensors); the tuple of entries is replaced whole (store(), a hit behind the
        # first) and read once by lookup(): a thread never pairs one call's key with another's arguments. The
        # values keep the fields' tensors alive while their ids are in the key; the dict is kept for a module's
        # held fields (which come back as the same object). ``size``: how many calls' arguments are kept (a
        # module: its own, one; the functions' shared caches: a few, so that two losses called in turn do not evict
        # each other's every step)
        self.size = size
        self._entries: tuple = ()

    @property
    def _entry(self) -> tuple | None:
        """The most recently used entry (None when empty)."""
        return self._entries[0] if self._entries else None

    @property
    def _args(self):
        """The most recently used value (None when empty)."""
        return self._entries[0][3] if self._entries else None

    @property
    def _fields(self) -> dict | None:
        """The fields dict of the most recently used entry (None when empty)."""
        return self._entries[0][2] if self._entries else None

    @staticmethod
    def _key_of(fields: dict, logits: Tensor) -> tuple | None:
        """(C, device, names, values with each tensor as (id, version, data pointer) and each other value beside its
        type); None for an inference tensor (no version counter). The pointer: ``torch.utils.swap_tensors``
        (``nn.Module._apply`` under ``torch.__future__.set_swap_module_params_on_conversion``) and ``t.data = other``
        keep a tensor's id, and its version can be the same number. The type: ``True == 1.0`` and ``2.0 == 2``, so
        a value the checks refuse (``tau=True``, ``ignore_index=2.0``) would otherwise hit a checked entry."""
        try:
            values = [(id(v), v._version, v.data_ptr()) if isinstance(v, Tensor) else (v.__class__, v)
                      for v in fields.values()]
        except RuntimeError:
            return None
        return logits.shape[1], logits.device, tuple(fields), values

    def _lookup_entry(self, fields: dict, logits: Tensor) -> tuple | None:
        entries = self._entries
        if not entries:
            return None
        entry = entries[0]
        if fields is entry[2]:
            # the very dict of the cached call: a loss module's held fields (``HeldFields._held_fields``), which it
            # never changes and makes anew when it or its buffers change; every other caller builds a dict per
            # call. Only the logits' class count and device remain to compare (host time: no key to build)
            return entry if logits.shape[1] == entry[0][0] and logits.device == entry[0][1] else None
        wanted = self._key_of(fields, logits)
        for i, entry in enumerate(entries):
            if entry[0] == wanted:
                if i:  # the most recently used first: the least recently used is dropped by store()
                    self._entries = (entry,) + entries[:i] + entries[i + 1:]
                return entry
        return None

    def store(self, fields: dict, logits: Tensor, args: AdjustedCEArgs) -> None:
        if _requiring_grad(fields) is not None:  # allowed without grad mode only: checked again by every call
            return
        key = self._key_of(fields, logits)
        if key is not None:  # (an inference tensor's fields are not kept)
            tensors = tuple(v for v in fields.values() if isinstance(v, Tensor))
            self._entries = ((key, tuple(fields.values()), fields, args, tensors),) + self._entries[:self.size - 1]

    def checked(self, fields: dict, logits: Tensor, target, ignore_index: int, check, *, use: bool = True,
                names: dict | None = None):
        """The cached value for ``fields`` (:meth:`_lookup_entry`; ``use=False``: never), with the call's rows checked
        (:func:`check_rows`: the fields were checked when it was stored); or None after ``check()``, the caller's
        whole check of a call whose fields are not cached. A field that requires grad is refused either way
        (:func:`refuse_requiring_grad`, ``names`` the caller's names of the fields): a cached tensor made to
        require grad in place (``requires_grad_()``: same id and version) too."""
        entry = self._lookup_entry(fields, logits) if use else None
        if entry is None:
            check()
            refuse_requiring_grad(fields, names)
            return None
        check_rows(logits, target, ignore_index)
        if entry[4] and torch.is_grad_enabled() and any(t.requires_grad for t in entry[4]):
            refuse_requiring_grad(fields, names)
        return entry[3]

    def operator_args(self, fields: dict, logits: Tensor, target, check, *, use: bool = True,
                      names: dict | None = None):
        """``(args, seed)``: the :class:`AdjustedCEArgs` of ``fields`` for ``logits`` (N, C) (or a broadcast
        stand-in), the cached ones (:meth:`checked`) or made and stored (``use=False``: made, not stored); ``seed``
        GCL's seed drawn for a call whose arguments were kept (they keep the one drawn when they were made), else
        None: one draw a call either way, as the reference path draws it. The losses' and the heads' glue."""
        args = self.checked(fields, logits, target, fields.get("ignore_index", -100), check, use=use, names=names)
        if args is not None:
            return args, (draw_seed() if fields.get("seed", 0) is None and args.has_noise else None)
        args = AdjustedCEArgs.from_fields(logits.device, fields)
        if use:
            self.store(fields, logits, args)
        return args, None


def _requiring_grad(fields: dict) -> str | None:
    """The name of the first tensor among ``fields`` that requires grad, or None."""
    for name, v in fields.items():  # (a loop: torch 2.8's dynamo cannot trace next(genexpr, None))
        if isinstance(v, Tensor) and v.requires_grad:
            return name
    return None


def refuse_requiring_grad(fields: dict, names: dict | None = None) -> None:
    """ValueError when, with grad mode on, a tensor among the kernels' parameters ``fields`` requires grad (a
    learnable prior, margin or weight): the kernels take them as constants and would leave it without a gradient,
    where the reference path's PyTorch ops give it one. ``names``: the caller's name of a field, where it differs
    (the heads' class weights are ``weight_classes``)."""
    name = _requiring_grad(fields)
    if name is not None and torch.is_grad_enabled():
        name = name if names is None else names.get(name, name)
        raise ValueError(f"{name} requires grad, but the Triton kernels take it as a constant and give it no "
                         f"gradient; detach it, or use backend='torch' (PyTorch ops, which differentiate it)")


_CLASS_TENSORS = ("log_prior", "cloud", "margin", "weight")


def inputs_state(args: AdjustedCEArgs, seed: int | None = None) -> tuple | None:
    """``(((name, tensor), ...), [version, ...])`` of the tensors a recompute backward reads again from ``args``: its
    (C,) class tensors (a module's buffers, as they are) and its noise seed where that is a tensor (CUDA graphs) and no
    int ``seed`` drawn for the call replaces it; None when there is none. :func:`check_inputs_unchanged` then checks
    them unchanged, as autograd checks the tensors an op saves (inference tensors have no version: left out)."""
    key = "watched" if seed is None else "watched, int seed"
    watched = args.memo.get(key)
    if watched is None:  # once per args (a module's are cached): which of its tensors have a version to watch
        names = _CLASS_TENSORS + (("seed",) if args.has_noise and seed is None else ())
        watched = args.memo[key] = tuple((name, t) for name in names if isinstance(t := getattr(args, name), Tensor)
                                         and not t.is_inference())
    return (watched, _versions(watched)) if watched else None


def _versions(watched: tuple) -> int:
    """The sum of the watched tensors' versions: a counter only grows, so the sum moves when any of them does (one
    number to keep and compare: host time)."""
    total = 0
    for _, t in watched:
        total += t._version
    return total


def check_inputs_unchanged(state: tuple | None) -> None:
    """RuntimeError when a tensor of :func:`inputs_state` was changed in place since the forward: the recompute
    backward would read other values than the forward's (a wrong gradient, no error; autograd raises the same for
    the tensors an op saves)."""
    if state is None or _versions(state[0]) == state[1]:
        return
    names = [name for name, _ in state[0]]
    what = {"log_prior": "the log prior", "cloud": "GCL's cloud", "margin": "the margins",
            "weight": "the class weights"}
    parts = [f"{what[name]} ({name}, a (C,) tensor of the loss, e.g. a module's buffer)" for name in names
             if name != "seed"]
    if "seed" in names:  # (one sum of versions: which one moved is not known)
        parts.insert(0, "the noise seed tensor was changed in place after the forward (seed_t.random_() or fill_() "
                        "before this backward)")
    raise RuntimeError("one of the variables needed for gradient computation has been modified by an inplace "
                       f"operation: {' or '.join(parts)}; the backward recomputes the forward from them. Change them "
                       "after the backward (assign a new tensor instead of editing one in place; for the seed, "
                       "grad_in_forward=True forms the gradient in the forward)")


def as_f32(t: Tensor | None) -> Tensor | None:
    """``t`` as a contiguous fp32 tensor (itself when it is one already: a module's buffer costs no dispatch)."""
    if t is None or (t.dtype == torch.float32 and t.is_contiguous()):
        return t
    return t.to(torch.float32).contiguous()


def check_rows(logits, target, ignore_index) -> None:
    """The logits (N, C) and the targets (class indices (N,), or class probabilities (N, C)) of a call."""
    V.check_logits("logits", logits)
    if isinstance(target, Tensor) and target.is_floating_point() and target.dim() >= 2:
        V.check_soft_target(target, logits)
        if ignore_index >= 0:  # a class index, silently unused (every row counts): F.cross_entropy refuses it too
            raise ValueError(f"ignore_index={ignore_index} is not supported with class-probability targets (every "
                             "row counts; F.cross_entropy refuses a non-negative one too): leave it negative "
                             "(-100, the default)")
    else:
        V.check_target(target, logits, ignore_index)


def check_operator_args(logits, target, fields: dict, *, noise=None) -> None:
    """Check the logits, the targets (class indices (N,), or class probabilities (N, C)) and the operator's
    parameters ``fields`` (by the names of :class:`AdjustedCEArgs`; ``seed`` may be None), for either backend: clear
    errors naming the argument, no host sync. ``logits`` may be a broadcast stand-in (the heads check without
    materialising them). ``noise``: the reference path's explicit (N, C) noise."""
    check_rows(logits, target, fields.get("ignore_index", -100))
    num_classes, device = logits.shape[1], logits.device
    for name, check, spec, none_ok in AdjustedCEArgs.__checks__:
        if name in fields:  # (not an object() sentinel: torch 2.8's dynamo cannot compare a SymNode with one)
            value = fields[name]
            if value is not None or not none_ok:
                check(name, value, spec, num_classes, device)
    # a term's weight without its class vector would be ignored, silently (tau = 0 and noise_mul = 0 are "off")
    if fields.get("log_prior") is None and fields.get("tau", 1.0) not in (0.0, 1.0):
        raise ValueError(f"tau={fields['tau']!r} weighs log_prior, which is not given (pass log_prior=)")
    if fields.get("cloud") is None and fields.get("noise_mul", 0.0) != 0.0:
        raise ValueError(f"noise_mul={fields['noise_mul']!r} scales GCL's noise by cloud, which is not given "
                         f"(pass cloud=)")
    if noise is not None:
        if not isinstance(noise, Tensor) or noise.shape != logits.shape:
            raise ValueError(f"noise must be a tensor of the logits' shape {tuple(logits.shape)}")
        if noise.device != logits.device:
            raise ValueError(f"noise is on {noise.device} but the logits are on {logits.device}")


# what LADELoss, lade_loss and a head with loss='lade' say to reduction='none' (given, or assigned later)
LADE_WITHOUT_NONE = ("reduction='none' is not defined for LADE (LADELoss, lade_loss, loss='lade' of a head): its "
                     "LADER term is a batch-level statistic; use 'mean' or 'sum'")


def check_lade_args(logits, target, prior, alpha, remine_lambda, reduction) -> None:
    """LADE's own arguments (beside its PriorCE operator's): ``prior`` (C,) pi, finite ``alpha`` and
    ``remine_lambda``, and a reduced loss (LADER is a batch statistic)."""
    V.check_logits("logits", logits)
    num_classes, device = logits.shape[1], logits.device
    values = dict(prior=prior, alpha=alpha, remine_lambda=remine_lambda)
    for name, spec in params(LadeArgs):
        spec.kind.check(name, values[name], spec, num_classes, device)
    if reduction == "none":
        raise ValueError(LADE_WITHOUT_NONE)


# --- the presets: each paper's hyperparameters mapped to the operator's, once ---------------------------------------

def la_fields(log_prior, tau: float) -> dict[str, Any]:
    """Logit adjustment (Menon et al., 2021) and Balanced Softmax (tau = 1): ``CE(z + tau * log_prior)``."""
    return dict(log_prior=log_prior, tau=tau)


def ldam_fields(margins, s: float) -> dict[str, Any]:
    """LDAM (Cao et al., 2019): ``CE(s * (z - m_y onehot(y)))``, ``margins`` (C,). ``s`` (> 0) is checked here, under
    the caller's name (the operator's check would say "scale")."""
    V.check_scale("s", s)
    return dict(margin=margins, scale=s)


def gcl_fields(cloud, m: float, s: float, noise_mul: float, gamma: float) -> dict[str, Any]:
    """GCL (Li et al., 2022) on cosine logits: ``CE(s * (cos - noise_mul * cloud * e - m onehot(y)))``, focal gamma.
    ``m``, ``s`` (> 0) and ``noise_mul`` (>= 0) are checked here, under the caller's names (the operator's checks
    would say "margin" and "scale")."""
    V.check_finite_float("m", m)
    V.check_scale("s", s)
    V.check_finite_float("noise_mul", noise_mul, min_value=0.0)
    return dict(cloud=cloud, noise_mul=noise_mul, margin=m, scale=s, gamma=gamma)


def tensor_stamp(t: Tensor) -> tuple | None:
    """``(version, data pointer, dtype)`` of ``t``: what moves when it is edited in place, given other data by
    ``t.data = other`` or ``torch.utils.swap_tensors`` (both keep its id, and its version can stay the same number)
    or cast by ``nn.Module`` (``.half()``, ``.to(device)``: ``param.data = ...``). None for an inference tensor (no
    version counter: nothing tells it unchanged)."""
    try:
        return t._version, t.data_ptr(), t.dtype
    except RuntimeError:
        return None


class HeldDerived:
    """One value ``make(t, *extra)`` made from a tensor ``t``, kept while ``t`` (the same object, its
    :func:`tensor_stamp` unchanged) and ``extra`` stay: so a module's step reads the same derived tensor every call
    (and the arguments cache, :class:`ArgsCache`, sees it unchanged). Made per call for an inference tensor. Holds
    ``t`` strongly, not by a weak reference, which ``torch.utils.swap_tensors`` refuses (and with it
    ``nn.Module._apply`` under ``torch.__future__.set_swap_module_params_on_conversion``)."""

    def __init__(self, make):
        self._make = make
        self._held: tuple | None = None  # (t, its stamp, extra, the value)

    def __getstate__(self) -> dict:
        """A copy (``copy.deepcopy``, pickle, ``torch.save``) holds no value: a copied tensor's version counter
        starts again, so an edit made after the value was kept could otherwise pass for no edit."""
        return {"_make": self._make, "_held": None}

    def __call__(self, t: Tensor, *extra):
        stamp = tensor_stamp(t)
        if stamp is None:  # an inference tensor: no version to know it unchanged by
            return self._make(t, *extra)
        held = self._held
        if held is None or held[0] is not t or held[1] != stamp or held[2] != extra:
            held = self._held = (t, stamp, extra, self._make(t, *extra))
        return held[3]


def _spread(cloud: Tensor, noise_mul: float) -> Tensor:
    return as_f32(cloud) * V.check_finite_float("noise_mul", noise_mul, min_value=0.0)


class FoldedSpread(HeldDerived):
    """GCL's ``noise_mul * cloud`` for the kernels, as a module holds it: ``fold(cloud, noise_mul)`` gives the fp32
    product and noise_mul 1 (noise_mul 0 or 1: both unchanged), so that the kernels read the noise's spread without
    a multiply per column (``Flags.NOISE_MODE`` 1). The same numbers: torch rounds the fp32 product as the kernels
    do. The product is kept while the cloud and noise_mul stay (:class:`HeldDerived`). While compiling it folds
    nothing (the kernels take noise_mul; it would guard on the tensor's version), nor a cloud that requires grad (a
    learned cloud: the kernels' check must see it, and refuse it; a product made under ``no_grad`` hid it)."""

    _make = staticmethod(_spread)  # (also for a module pickled before FoldedSpread was a HeldDerived: no _make)

    def __init__(self):
        super().__init__(_spread)

    def __call__(self, cloud: Tensor, noise_mul: float) -> tuple[Tensor, float]:
        if noise_mul == 0.0 or noise_mul == 1.0 or cloud.requires_grad or torch.compiler.is_compiling():
            return cloud, noise_mul
        return super().__call__(cloud, noise_mul), 1.0


# --- the other declared groups of the custom ops -------------------------------------------------------------------

@declared
@dataclass(frozen=True)
class LadeArgs:
    """LADE's parameters beside its PriorCE operator (``log_prior = log(pi + 1e-9)``, tau = 1)."""

    prior: Tensor = param(None, PRIOR_VECTOR, "(C,) fp32 training prior pi (probabilities)")
    alpha: float = param(0.1, FLOAT, "the weight of LADER", low=0.0)
    remine_lambda: float = param(0.1, FLOAT, "LADER's quadratic penalty lambda", low=0.0)


@declared
@dataclass(frozen=True)
class ChunkPlan:
    """How a fused head walks its (N, C) logits: ``rows`` per row chunk, or ``classes`` per class chunk (set: the
    class-chunked path)."""

    rows: int = param(1, INT, "rows per chunk of the row-chunked path; 0 (compiled): chosen by the op from its "
                      "tensors' shapes (fastlt.heads.glue.resolved_plan), so that a graph takes every batch size",
                      low=0)
    classes: int | None = param(None, OPTIONAL_INT, "classes per chunk of the class-chunked path (None: rows)")


@declared
@dataclass(frozen=True)
class Needs:
    """Which gradients of a fused head to compute: features, weight, bias."""

    x: bool = param(False, BOOL, "d loss / d features")
    w: bool = param(False, BOOL, "d loss / d weight")
    b: bool = param(False, BOOL, "d loss / d bias")

    @property
    def any(self) -> bool:
        return self.x or self.w or self.b


# --- flat forms for torch.library, derived from the declarations -------------------------------------------------

def op_schema(inputs: str, groups: Iterable[type], outputs: str) -> str:
    """A custom op's schema: ``(inputs, <each group's slots>) -> outputs``; slot names are the field names (plus
    the kind's suffixes)."""
    slots = [f"{typ} {name}{suffix}" for g in groups for name, spec in params(g) for suffix, typ in spec.kind.slots]
    return f"({', '.join([inputs] + slots if inputs else slots)}) -> {outputs}"


def flatten(*groups) -> tuple:
    """The flat values of declared dataclass instances, in the order of :func:`op_schema`."""
    return tuple(v for g in groups for name, spec in params(g) for v in spec.kind.to_flat(getattr(g, name)))


def unflatten(groups: Iterable[type], flat: Iterable) -> tuple:
    """Instances of the declared ``groups`` from their flat values (:func:`flatten`'s inverse), field by field."""
    values = iter(flat)
    out = []
    for g in groups:
        kw = {}
        for name, spec in params(g):
            kw[name] = spec.kind.from_flat(tuple(next(values) for _ in spec.kind.slots))
        out.append(g(**kw))
    rest = tuple(values)
    if rest:
        raise ValueError(f"{len(rest)} flat values left over after {[g.__name__ for g in groups]}")
    return tuple(out)


def num_slots(groups: Iterable[type]) -> int:
    """How many flat values the declared ``groups`` take."""
    return sum(len(spec.kind.slots) for g in groups for _, spec in params(g))


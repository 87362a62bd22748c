"""Argument checks shared by every public function: clear errors that name the argument.

Checks here never synchronise with the GPU: they look at shapes, dtypes and Python values only,
except the ones whose name says ``_values`` (they read tensor contents and are meant for
construction time, e.g. class counts, not for the per-step hot path).
"""

from __future__ import annotations

import math
from numbers import Integral, Real

import numpy as np
import torch
import torch.autograd.forward_ad as _forward_ad

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# integer dtypes of class labels; torch's uint16/32/64 (numpy arrays of those types) where this torch has them
INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8) + tuple(
    getattr(torch, name) for name in ("uint16", "uint32", "uint64") if hasattr(torch, name))
REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "torch", "triton")


def _isfinite(value: float) -> bool:
    """``math.isfinite`` as comparisons: dynamo traces a scheduled float as a symbol, on which ``math.isfinite``
    breaks the graph while a comparison becomes a guard (and eagerly, no ``is_compiling`` call per check)."""
    return value == value and -math.inf < value < math.inf


_WRAPPED = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)


def under_functorch(t: torch.Tensor) -> bool:
    """Whether ``t`` is a ``torch.func`` transform's tensor (``grad``, ``vmap``, ``jacrev``, ...): its values cannot
    be read on the host (a vmap's batch), and the kernels' autograd Functions are not functorch rules. False while
    torch.compile traces (Dynamo cannot trace the question; it runs transforms its own way)."""
    return _WRAPPED is not None and not torch.compiler.is_compiling() and _WRAPPED(t)


_LEVEL = getattr(torch._C._functorch, "maybe_current_level", None)  # a torch.func transform's level, or None


def under_transform(t: torch.Tensor) -> bool:
    """Whether a call on ``t`` runs under a ``torch.func`` transform (``grad``, ``vmap``, ``jacrev``, ...) or a
    forward-mode AD level (``torch.autograd.forward_ad.dual_level``), or ``t`` is a transform's tensor: any of the
    call's tensors may then be the transform's or carry a tangent (targets, class weights, a prior, not only the
    logits), which the kernels' autograd Functions do not propagate. False while torch.compile traces (as
    :func:`under_functorch`)."""
    if torch.compiler.is_compiling():
        return False
    return ((_LEVEL is not None and _LEVEL() is not None) or _forward_ad._current_level >= 0
            or (_WRAPPED is not None and _WRAPPED(t)))


_STACK = getattr(torch._C._functorch, "get_interpreter_stack", None)


def per_sample_rows(rows: torch.Tensor) -> bool:
    """Whether ``rows`` (N, C) is one sample's batch of one under ``torch.func.vmap`` (per-sample gradients: a vmap
    among the active transforms and N = 1 as the function sees it), where a batch statistic or a function of the
    row index is not the batch's. A vmap over whole batches (``jacfwd``'s tangents, an ensemble's models) sees N
    rows and is not one."""
    if rows.shape[0] != 1 or _LEVEL is None or _STACK is None or _LEVEL() is None or torch.compiler.is_compiling():
        return False
    return any(i.key() == torch._C._functorch.TransformType.Vmap for i in _STACK() or ())


def host_readable(t: torch.Tensor) -> bool:
    """Whether ``t``'s values may be read on the host here: a CPU tensor (no GPU sync), outside torch.compile's
    tracing (no data-dependent branch in a graph) and outside a ``torch.func`` transform (its batch)."""
    return (t.device.type == "cpu" and not torch.compiler.is_compiling()
            and not (_WRAPPED is not None and _WRAPPED(t)))


def check_scale(name: str, value) -> float:
    """A logit scale (LDAM's and GCL's ``s``): a finite real > 0 (0 gives a constant loss, below 0 flips the
    logits); returned as float."""
    return check_finite_float(name, value, min_value=0.0, min_inclusive=False)


def check_finite_float(name: str, value, *, min_value: float | None = None,
                       max_value: float | None = None, min_inclusive: bool = True) -> float:
    """A Python real number that is finite (and inside the given range); returned as float."""
    if type(value) is not float and (isinstance(value, bool) or not isinstance(value, Real)):  # float: no ABC check
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not _isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if min_value is not None and (value < min_value or (not min_inclusive and value == min_value)):
        op = ">=" if min_inclusive else ">"
        raise ValueError(f"{name} must be {op} {min_value}, got {value}")
    if max_value is not None and value > max_value:
        raise ValueError(f"{name} must be <= {max_value}, got {value}")
    return value


def is_int(value) -> bool:
    """A Python or numpy integer, not a bool (what ``torch.nn.functional.cross_entropy`` takes as an int)."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def check_int64(name: str, value) -> int:
    """A Python or numpy integer (not a bool) in int64 (TypeError, ValueError); returned as int."""
    if not is_int(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if not -2**63 <= value < 2**63:
        raise ValueError(f"{name} must fit in int64, got {value}")
    return value


def check_ignore_index(value) -> int:
    """``ignore_index``: :func:`check_int64`."""
    return check_int64("ignore_index", value)


def check_int(name: str, value, min_value: int) -> int:
    """A Python or numpy integer (not a bool) of at least ``min_value``; returned as int."""
    if not is_int(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if value < min_value:
        raise ValueError(f"{name} must be >= {min_value}, got {value}")
    return value


def check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_logits(name: str, logits, min_classes: int = 1) -> None:
    """(N, C) floating tensor with C >= ``min_classes`` (1; 0 for a class shard's local logits, which may be empty)."""
    check_matrix(name, logits, "(N, C)")
    if logits.shape[1] < min_classes:
        raise ValueError(f"{name} must have at least one class (C >= 1), got shape {tuple(logits.shape)}")


def check_shaped_logits(name: str, logits, min_classes: int = 1) -> None:
    """Logits of a shape ``F.cross_entropy`` takes: (C,), (N, C) or (N, C, d1, ...), floating, C >= ``min_classes``
    (1; 0 for a class shard's local logits)."""
    if isinstance(logits, torch.Tensor) and logits.dim() not in (0, 2):
        if logits.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {logits.dtype}")
        if logits.shape[0 if logits.dim() == 1 else 1] < min_classes:
            raise ValueError(f"{name} must have at least one class (C >= 1), got shape {tuple(logits.shape)}")
        return
    if isinstance(logits, torch.Tensor) and logits.dim() == 0:
        raise ValueError(f"{name} must have shape (C,), (N, C) or (N, C, d1, ...), got a 0-dim tensor")
    check_logits(name, logits, min_classes)


def as_index_target(target, *, keep_int32: bool = True):
    """Integer targets other than int64 widened to int64, so ``target != ignore_index`` never wraps (-100 is 156 in
    uint8). ``keep_int32``: int32 passes through (the kernels read it, and compare in int64); the reference path
    passes False, as torch would wrap an ``ignore_index`` outside int32 to the targets' dtype (2^32 -> 0)."""
    if isinstance(target, torch.Tensor) and target.dtype in INT_DTYPES[2 if keep_int32 else 1:]:
        return target.long()
    return target


def as_kernel_target(target):
    """The targets as the Triton paths take them: class indices as :func:`as_index_target` (int32 kept) and
    contiguous (the kernels read row i's target at offset i: a strided view such as ``labels[:, 0]`` would be read
    as other rows' targets); class probabilities as given (read with their strides), but not while they require
    grad: the kernels do not differentiate the targets, where the reference path does (ValueError, not a silently
    missing gradient)."""
    target = as_index_target(target)
    if not isinstance(target, torch.Tensor):
        return target
    if target.requires_grad and torch.is_grad_enabled():  # only floating tensors can require grad
        raise ValueError("target: the Triton kernels do not differentiate class-probability targets, and these "
                         "require grad; detach them (a teacher's probabilities, say), or use backend='torch', "
                         "whose reference path differentiates them")
    if not target.is_floating_point() and not target.is_contiguous():
        target = target.contiguous()
    return target


def check_target(target, logits: torch.Tensor, ignore_index: int) -> None:
    """(N,) integer tensor on the logits' device. Range is checked only on the CPU (no GPU sync)."""
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.dtype not in INT_DTYPES:
        raise TypeError(f"target must hold integer class indices (N,) or class probabilities of the logits' shape "
                        f"{tuple(logits.shape)}, got {target.dtype} {tuple(target.shape)}")
    if target.dim() != 1 or target.shape[0] != logits.shape[0]:
        hint = ""
        if target.shape == logits.shape:  # one-hot rows as integers (F.one_hot): torch names the float dtype too
            hint = "; class probabilities of the logits' shape must be floating (target.float() for one-hot rows)"
        elif target.dim() == 2 and target.shape[1] == 1:
            hint = "; an (N, 1) target: target.squeeze(1)"
        raise ValueError(
            f"target must have shape (N,) = ({logits.shape[0]},) to match the rows of the logits (of a head's "
            f"features), got {tuple(target.shape)}{hint}"
        )
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device} but the logits are on {logits.device}")
    ignore_index = check_ignore_index(ignore_index)
    # the range check reads values: only for CPU tensors (no GPU sync), never inside torch.compile or a torch.func
    # transform; on the GPU the kernels mask their loads and give NaN for a row whose target is out of range
    if target.numel() > 0 and host_readable(target):
        wide = target.long()
        valid = wide[wide != ignore_index]
        if valid.numel() > 0:
            lo, hi = int(valid.min()), int(valid.max())
            num_classes = logits.shape[1]
            if lo < 0 or hi >= num_classes:
                bad = lo if lo < 0 else hi
                raise ValueError(
                    f"target holds class {bad}, outside [0, {num_classes}) "
                    f"(and not ignore_index={ignore_index})"
                )


def check_soft_target(target, logits: torch.Tensor) -> None:
    """(N, C) class probabilities: floating, the logits' shape and device. On the CPU (no GPU sync) also finite and
    non-negative (rows need not sum to 1, as ``F.cross_entropy`` does not ask it)."""
    if target.dtype not in FLOAT_DTYPES:
        raise TypeError(f"class-probability targets must be floating, got {target.dtype}")
    if target.shape != logits.shape:
        raise ValueError(f"class-probability targets must have the logits' shape {tuple(logits.shape)}, got "
                         f"{tuple(target.shape)}")
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device} but the logits are on {logits.device}")
    if target.numel() > 0 and host_readable(target):
        if not bool(torch.isfinite(target).all()) or bool((target < 0).any()):
            raise ValueError("class-probability targets must be finite and non-negative")


# the values a class vector must hold (check_class_vector's ``values``), checked where they can be read without a GPU
# sync (host_readable: CPU tensors): finite (weights, margins, cloud sizes); a log prior (NaN and +inf refused, -inf
# leaves a class out); a prior pi (finite, non-negative, summing to 1)
FINITE, LOG_PRIOR, PRIOR = "finite", "log prior", "prior"
PRIOR_SUM_TOLERANCE = 1e-3  # a prior's |sum - 1| at most this (0.05 for a 16-bit one: fp16 subnormals round a
# near-uniform prior of 10^6 classes by 1%)


def check_class_vector(name: str, vec, num_classes: int, device: torch.device | None = None,
                       values: str | None = None) -> None:
    """A (C,) floating tensor (class weights, priors, margins); ``values``: what its values must be (FINITE,
    LOG_PRIOR, PRIOR), checked on the CPU only (no GPU sync)."""
    if not isinstance(vec, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(vec).__name__}")
    if vec.dim() != 1 or vec.shape[0] != num_classes:
        raise ValueError(f"{name} must have shape (C,) = ({num_classes},), got {tuple(vec.shape)}")
    if vec.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor, got {vec.dtype}")
    if device is not None and vec.device != device:
        raise ValueError(f"{name} is on {vec.device} but the logits are on {device} (a loss module or head: move it "
                         f"with .to(logits.device), as a layer)")
    if values is not None and vec.numel() and host_readable(vec):
        check_class_values(name, vec, values)


def check_class_values(name: str, vec: torch.Tensor, values: str) -> None:
    """``vec``'s values are of the kind ``values`` (see :func:`check_class_vector`); reads them (a CPU tensor). A
    prior that requires grad (learned) is not held to its sum (an optimiser step moves it)."""
    learned, vec = vec.requires_grad, vec.detach()
    if values == LOG_PRIOR:
        if bool((torch.isnan(vec) | (vec == math.inf)).any()):
            raise ValueError(f"{name} must not hold NaN or +inf (it is log pi; -inf leaves a class out)")
        return
    if not bool(torch.isfinite(vec).all()):
        raise ValueError(f"{name} must be finite")
    if values == PRIOR:
        total, low = float(vec.double().sum()), float(vec.min())
        tolerance = PRIOR_SUM_TOLERANCE if torch.finfo(vec.dtype).bits > 16 else 0.05
        if low < 0 or (not learned and abs(total - 1.0) > tolerance):
            raise ValueError(f"{name} must be pi, the training prior: non-negative and summing to 1 (within "
                             f"{tolerance:g}), as fastlt.priors.prior(class_counts) makes it; got sum {total:g}, "
                             f"smallest {low:g}")


def torch_ready(value):
    """``value`` as ``torch.as_tensor`` takes it: a numpy array with a negative stride (a reversed one,
    ``np.flip``), which it refuses, copied contiguous; anything else as it is."""
    if isinstance(value, np.ndarray) and any(stride < 0 for stride in value.strides):
        return np.ascontiguousarray(value)
    return value


def as_cpu_tensor(value) -> torch.Tensor:
    """``torch.as_tensor(value)`` on the CPU, where a sequence of Python floats becomes float64, not torch's default
    float32 (which rounded counts above 2^24 and could round a non-whole count to a whole one). Arrays and tensors
    keep their dtype; a reversed numpy array is taken too (:func:`torch_ready`)."""
    value = torch_ready(value)
    t = torch.as_tensor(value, device="cpu")
    if t.is_floating_point() and t.dtype != torch.float64 and not hasattr(value, "dtype"):
        t = torch.as_tensor(value, dtype=torch.float64, device="cpu")
    return t


def as_class_counts(class_counts, *, smoothing: float = 0.0) -> torch.Tensor:
    """Validated per-class training counts as a float64 CPU tensor, ``counts + smoothing``.

    Accepts a sequence, numpy array or tensor of non-negative integers (floats holding whole numbers
    are accepted). Zero counts raise unless ``smoothing > 0``: a zero count means log(prior) = -inf.
    """
    smoothing = check_finite_float("count_smoothing", smoothing, min_value=0.0)
    if isinstance(class_counts, torch.Tensor):
        if class_counts.is_meta:
            raise ValueError("class_counts is a meta tensor, which holds no values: give the counts as a sequence, "
                             "a numpy array or a CPU tensor (also under `with torch.device('meta')`)")
        counts = class_counts.detach().to("cpu")
    else:
        try:  # on the CPU also under `with torch.device(...)`: the counts are read here
            counts = as_cpu_tensor(class_counts)
        except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
            raise TypeError(f"class_counts must be a sequence of integers within int64 "
                            f"({type(exc).__name__}: {exc}), got {type(class_counts).__name__}") from exc
    if counts.dtype == torch.bool or counts.is_complex():
        raise TypeError(f"class_counts must hold integers, got {counts.dtype}")
    if counts.dim() != 1 or counts.numel() < 1:
        raise ValueError(f"class_counts must be a non-empty 1-D sequence, got shape {tuple(counts.shape)}")
    counts = counts.to(torch.float64)
    if not torch.isfinite(counts).all():
        raise ValueError("class_counts must be finite")
    if (counts != counts.round()).any():
        raise TypeError("class_counts must hold whole numbers (per-class training counts, not a prior; for a known "
                        "prior pi, assign the module's log_prior = pi.log() after building it from any counts)")
    if (counts < 0).any():
        bad = int(torch.nonzero(counts < 0)[0, 0])
        raise ValueError(f"class_counts must be non-negative; class {bad} has {counts[bad].item():g}")
    if smoothing == 0.0 and (counts == 0).any():
        bad = int(torch.nonzero(counts == 0)[0, 0])
        raise ValueError(
            f"class_counts has a zero count (class {bad}): its log prior would be -inf. "
            "Pass count_smoothing > 0 (counts + smoothing) to opt into smoothing. (These are per-class counts: "
            "count training labels with fastlt.data.class_counts(labels, num_classes).)"
        )
    return counts + smoothing


def check_num_classes(logits: torch.Tensor, num_classes: int, what: str = "class_counts") -> None:
    """C (dim 1; dim 0 of unbatched (C,) logits) equals ``num_classes``."""
    C = logits.shape[0 if logits.dim() == 1 else 1]
    if C != num_classes:
        raise ValueError(f"logits have C = {C} classes but {what} describes {num_classes} classes")


def check_seed(name: str, seed, device: torch.device | None = None) -> None:
    """A noise seed: an int in [0, 2^63) (the 64-bit Philox key), or a one-element int64 tensor
    (:func:`check_seed_tensor`; on ``device`` when one is given)."""
    if isinstance(seed, torch.Tensor):
        check_seed_tensor(seed, device)
    elif not is_int(seed):
        raise TypeError(f"{name} must be a non-negative int or a one-element int64 tensor, got "
                        f"{type(seed).__name__} {seed!r}")
    elif not 0 <= seed < 2**63:
        raise ValueError(f"{name} must be in [0, 2^63) (a 64-bit Philox key), got {seed}")


def check_seed_tensor(seed: torch.Tensor, device: torch.device | None) -> None:
    """A seed given as a tensor: one int64 value, on the logits' ``device`` where one is given (read by the kernels
    there; on the CPU its value is checked too)."""
    if seed.dtype != torch.int64:
        raise TypeError(f"a seed tensor must hold one int64 value, got {seed.dtype}")
    if seed.numel() != 1:
        raise ValueError(f"a seed tensor must hold one value (shape () or (1,)), got shape {tuple(seed.shape)}")
    if device is not None and seed.device != device:
        raise ValueError(f"the seed tensor is on {seed.device} but the logits are on {device}")
    if host_readable(seed) and int(seed) < 0:
        raise ValueError(f"seed must be in [0, 2^63) (a 64-bit Philox key), got {int(seed)}")


def init_loss_options(module, weight_name: str, weight, num_classes: int, *, ignore_index, reduction,
                      label_smoothing, backend, persistent: bool = True) -> None:
    """Validate the options every loss module shares and set them on ``module``: the (C,) class weights as
    the buffer ``weight_name`` (float32, float64 kept as it is, or None; in the state dict when ``persistent``, as
    ``nn.CrossEntropyLoss``'s ``weight``), ``ignore_index``, ``reduction``, ``label_smoothing``, ``backend``. Learned
    class weights, an ``nn.Parameter``, are kept as the module's parameter itself, as assigning one makes them (the
    reference path differentiates them, the kernels refuse them in grad mode); another tensor that requires grad is
    refused (copied, it would silently get no gradient)."""
    if isinstance(weight, torch.nn.Parameter) and weight.requires_grad:
        check_class_vector(weight_name, weight, num_classes)
        setattr(module, weight_name, weight)
        weight = None
        weight_name = None
    elif isinstance(weight, torch.Tensor) and weight.requires_grad:
        raise ValueError(f"{weight_name} requires grad, and would be copied into a buffer without it: pass an "
                         f"nn.Parameter to learn the class weights (the module keeps it as its parameter), or "
                         f"detach it")
    if weight is not None:
        try:
            as_tensor = weight.detach() if isinstance(weight, torch.Tensor) else torch.as_tensor(torch_ready(weight))
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"{weight_name} must be a (C,) tensor or sequence of floats, got "
                            f"{type(weight).__name__}") from exc
        check_class_vector(weight_name, as_tensor, num_classes)
        # construction time: reading the values costs no step a sync, on any device (a meta tensor has none to read)
        if as_tensor.device.type != "meta":
            check_class_values(weight_name, as_tensor, FINITE)
        # float64 stays float64 (nn.CrossEntropyLoss keeps its weight's dtype: a float64 model's loss is exact, and
        # .double() could not undo a rounding); the rest (integers, 16-bit floats) becomes float32
        weight = as_tensor.to(torch.float64 if as_tensor.dtype == torch.float64 else torch.float32)
        if weight.is_inference():  # made under torch.inference_mode: a copy that a backward can save
            with torch.inference_mode(False):
                weight = weight.clone()
    if weight_name is not None:
        module.register_buffer(weight_name, weight, persistent=persistent)
    module.ignore_index = check_ignore_index(ignore_index)
    module.reduction = check_choice("reduction", reduction, REDUCTIONS)
    module.label_smoothing = check_finite_float("label_smoothing", label_smoothing, min_value=0.0, max_value=1.0)
    module.backend = check_choice("backend", backend, BACKENDS)


def refuse_old_name(name: str, value, old_name: str, old_value):
    """The value of keyword ``name``; its old name ``old_name`` (``prior=``, which held log pi) is a ``TypeError``:
    'prior' means pi everywhere else in fastlt (``lade_loss``, ``fastlt.priors.prior``), and pi taken as log pi
    gives a wrong loss silently (a ``DeprecationWarning`` is hidden outside ``__main__``)."""
    if old_value is not None:
        raise TypeError(f"{old_name}= is not taken here: the argument is {name}=, log pi (fastlt.priors.log_prior("
                        f"class_counts)); 'prior' means pi in fastlt, and pi read as log pi gives a wrong loss")
    return value


def check_matrix(name: str, t, what: str) -> None:
    """A 2-D floating tensor, ``what`` naming its shape in the message."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must have shape {what}, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def check_dtype_matches_weight(features: torch.Tensor, weight: torch.Tensor) -> None:
    """TypeError when ``features`` and a layer's ``weight`` differ in dtype outside ``torch.autocast`` (CUDA or CPU),
    which casts both (as ``nn.Linear`` would fail, with a bare RuntimeError)."""
    if features.dtype != weight.dtype:
        dev = features.device.type
        if not (dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev)):
            raise TypeError(f"features are {features.dtype} but weight is {weight.dtype}: cast one "
                            "(model.to(...)), or run under torch.autocast")


def check_head(features, weight, bias, weight_classes=None) -> None:
    """A head's inputs: ``features`` (N, D), ``weight`` (C, D) with C >= 1, ``bias`` (C,) or None, one dtype and
    device; the class weights ``weight_classes`` (C,) or None, checked here under that name (the loss's checks
    would call them ``weight``, which a head's functions and modules name the (C, D) matrix)."""
    check_matrix("features", features, "(N, D)")
    check_matrix("weight", weight, "(C, D)")
    D = features.shape[1]
    C = weight.shape[0]
    if weight.shape[1] != D:
        raise ValueError(f"features (N, D) and weight (C, D) must agree on D: features have shape "
                         f"{tuple(features.shape)}, weight {tuple(weight.shape)}")
    if C < 1:
        raise ValueError(f"weight must have at least one class (C >= 1), got shape {tuple(weight.shape)}")
    if weight.dtype != features.dtype:
        raise TypeError(f"weight has dtype {weight.dtype} but features have {features.dtype}; they must match "
                        "(cast one, or run under torch.autocast)")
    if weight.device != features.device:
        raise ValueError(f"weight is on {weight.device} but features are on {features.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if bias.dim() != 1 or bias.shape[0] != C:
            raise ValueError(f"bias must have shape (C,) = ({C},), got {tuple(bias.shape)}")
        if bias.dtype != features.dtype:
            raise TypeError(f"bias has dtype {bias.dtype} but features have {features.dtype}; they must match")
        if bias.device != features.device:
            raise ValueError(f"bias is on {bias.device} but features are on {features.device}")
    if weight_classes is not None:
        check_class_vector("weight_classes", weight_classes, C, features.device, FINITE)


def check_chunks(chunk_rows, chunk_classes) -> None:
    """A head's chunking: ``chunk_rows`` a positive int or None, ``chunk_classes`` a positive multiple of 8 or None,
    not both."""
    if chunk_rows is not None and (not is_int(chunk_rows) or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be a positive int or None, got {chunk_rows!r}")
    if chunk_classes is None:
        return
    if not is_int(chunk_classes) or chunk_classes < 8 or chunk_classes % 8:
        raise ValueError(f"chunk_classes must be a positive multiple of 8 or None, got {chunk_classes!r}")
    if chunk_rows is not None:
        raise ValueError("give chunk_rows or chunk_classes, not both (they pick the row- or the class-chunked path)")

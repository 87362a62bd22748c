"""Data side of long-tailed training: class counts, long-tailed splits and re-balancing samplers.

- ``class_counts``: per-class counts ``n`` (C,) of integer labels, the input of every prior.
- ``long_tailed_counts`` / ``long_tailed_indices``: the exponential (CIFAR-LT) and step profiles,
  and a subsample of a balanced dataset that follows them.
- ``ClassBalancedSampler``: sample of class j drawn with probability ∝ ``n_j^q / n_j``.
- ``CBENSampler``: GCL's stage-2 sampler (effective-number weights with a per-class beta).

Both samplers draw a class first (multinomial over per-class mass), then a sample uniformly inside
it; without replacement they fall back to one multinomial over the per-sample weights. Under data parallelism
(``num_replicas``/``rank``, or an initialised ``torch.distributed``) every rank draws the same seeded stream of
the epoch (``seed + epoch``; ``set_epoch``) and keeps every ``num_replicas``-th index from its rank, as torch's
``DistributedSampler`` does: equal lengths, and the ranks' union is one process's draw.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch.utils.data import Sampler

from ._validation import INT_DTYPES, check_choice, check_finite_float, check_int, torch_ready
from .distributed.ranks import replicas, shared_seed

if TYPE_CHECKING:
    import numpy as np

PROFILES = ("exp", "step")


def _check_generator(generator) -> torch.Generator | None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    return generator


def _as_labels(labels, name: str = "labels") -> torch.Tensor:
    """Integer labels (tensor, sequence or numpy array) as a 1-D int64 CPU tensor; non-negative."""
    if isinstance(labels, torch.Tensor):
        out = labels.detach().to("cpu")
    else:
        try:
            out = torch.as_tensor(torch_ready(labels))
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"{name} must be a sequence of integers, got {type(labels).__name__}") from exc
    if out.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(out.shape)}")
    if out.dtype not in INT_DTYPES and out.numel() > 0:  # an empty [] or numpy array is float: nothing to check
        raise TypeError(f"{name} must hold integer class indices, got {out.dtype}")
    out = out.to(torch.int64)
    if out.numel() > 0 and int(out.min()) < 0:  # (a uint64 label past 2^63 - 1 lands here too)
        raise ValueError(f"{name} must be non-negative class indices, got {int(out.min())}")
    return out


_MAX_INFERRED_CLASSES = 2**28  # what labels.max() + 1 may give without num_classes (2**28 int64 counts: 2 GiB)


def class_counts(labels: torch.Tensor | Sequence[int] | np.ndarray, num_classes: int | None = None) -> torch.Tensor:
    """Per-class counts ``n_j = #{i : labels_i == j}``, a (C,) int64 tensor.

    Args:
        labels: (N,) integer labels (tensor, sequence or numpy array of any integer dtype), each in
            ``[0, num_classes)``.
        num_classes: the number of classes C; defaults to ``labels.max() + 1`` (at most 2^28: a larger label
            raises unless num_classes asks for it). Classes without samples count 0.

    Returns:
        (C,) int64 CPU tensor of per-class counts.
    """
    labels = _as_labels(labels)
    if num_classes is None:
        if labels.numel() == 0:
            raise ValueError("labels is empty: pass num_classes to count an empty label set")
        num_classes = int(labels.max()) + 1
        if num_classes > _MAX_INFERRED_CLASSES:  # a stray label (an id, a hash) would allocate a count per class
            raise ValueError(f"labels holds class {num_classes - 1}: counting up to it would allocate {num_classes} "
                             "counts (a stray id?); labels are 0..C-1, and class_counts counts more than 2^28 "
                             "classes only when num_classes asks for them")
    else:
        num_classes = check_int("num_classes", num_classes, 1)
        if labels.numel() > 0 and int(labels.max()) >= num_classes:
            top = int(labels.max())
            raise ValueError(f"labels holds class {top}, outside [0, num_classes={num_classes})")
    return torch.bincount(labels, minlength=num_classes)


def long_tailed_counts(num_classes: int, max_count: int, imbalance_ratio: float, profile: str = "exp",
                       step_fraction: float = 0.5) -> list[int]:
    """Per-class counts ``[n_0, ..., n_{C-1}]`` of a long-tailed split, non-increasing in j.

    - ``'exp'`` (CIFAR-LT): ``n_j = floor(n_max * r^(-j/(C-1)))``, so ``n_0 = n_max`` and
      ``n_{C-1} = floor(n_max / r)``; ``C = 1`` gives ``[n_max]``.
    - ``'step'``: the first ``floor(C * (1 - step_fraction))`` classes get ``n_max``, the other
      ``ceil(C * step_fraction)`` get ``floor(n_max / r)`` (so a lone class with ``step_fraction > 0``
      is a tail class).

    Every count is at least 1 (only matters when ``n_max < r``). ``r = imbalance_ratio >= 1``. The floors
    are guarded (a value within 64 ulps of an integer is that integer) and the ceiling has a 1e-12 relative guard,
    so e.g. ``n_max = 98, r = 49`` ends at 2, not at 1 as a bare float ``98 * (1/49)`` would, and
    ``C = 90, step_fraction = 0.3`` has 27 tail classes, not the 28 of a bare ``ceil(90 * 0.3)``
    (27.000000000000004).

    Args:
        num_classes: the number of classes C, at least 1.
        max_count: ``n_max``, the head-class count, at least 1.
        imbalance_ratio: ``r >= 1``; the tail count is ``floor(n_max / r)``.
        profile: ``'exp'`` or ``'step'``.
        step_fraction: for ``'step'``, the fraction of tail classes, in [0, 1]; ignored by ``'exp'``.

    Returns:
        A list of C Python ints, each at least 1, non-increasing in j.
    """
    num_classes = check_int("num_classes", num_classes, 1)
    max_count = check_int("max_count", max_count, 1)
    r = check_finite_float("imbalance_ratio", imbalance_ratio, min_value=1.0)
    check_choice("profile", profile, PROFILES)
    step_fraction = check_finite_float("step_fraction", step_fraction, min_value=0.0, max_value=1.0)
    if profile == "exp":
        if num_classes == 1:
            return [max_count]
        # (1/r)^(j/(C-1)) as the CIFAR-LT code computes it, so the published splits are reproduced.
        counts = [max_count] + [min(max_count, _floor(max_count * (1.0 / r) ** (j / (num_classes - 1))))
                                for j in range(1, num_classes)]
    else:
        tail = math.ceil(num_classes * step_fraction * (1.0 - 1e-12))  # ceil(C sf) = C - floor(C (1 - sf))
        counts = [max_count] * (num_classes - tail) + [min(max_count, _floor(max_count / r))] * tail
    return [max(1, n) for n in counts]


def _floor(x: float) -> int:
    """floor(x), guarded so that an exact integer computed a few ulps below it (98 * (1/49) = 1.9999999999999998)
    still gives it: within 64 ulps of an integer, that integer. (A relative guard, ``x (1 + 1e-12)``, added 1 to
    every count from 10^12 up.)"""
    nearest = round(x)
    return nearest if abs(x - nearest) <= 64 * math.ulp(x) else math.floor(x)


def long_tailed_indices(labels: torch.Tensor | Sequence[int] | np.ndarray, imbalance_ratio: float,
                        profile: str = "exp", max_count: int | None = None,
                        generator: torch.Generator | None = None, *,
                        step_fraction: float = 0.5) -> torch.Tensor:
    """Indices (sorted, int64) of a long-tailed subsample of a (balanced) labelled dataset.

    Class j keeps ``n_j`` of its samples, ``n = long_tailed_counts(C, max_count, imbalance_ratio,
    profile, step_fraction)`` with ``C = labels.max() + 1``: the first ``n_j`` in dataset order when
    ``generator`` is None, else a random subset drawn with ``generator`` (deterministic for a seeded
    generator). ``max_count`` defaults to the smallest class size, so every class can supply its quota.

    Args:
        labels: (N,) integer labels (tensor, sequence or numpy array) of the full dataset; every class
            ``0..labels.max()`` must have at least one sample.
        imbalance_ratio: ``r >= 1`` (see ``long_tailed_counts``).
        profile: ``'exp'`` or ``'step'`` (see ``long_tailed_counts``).
        max_count: ``n_max``, the head-class count; defaults to the smallest class size.
        generator: draws the kept subset of each class; None keeps the first ``n_j`` in dataset order.
        step_fraction: for ``'step'``, the fraction of tail classes, in [0, 1].

    Returns:
        (M,) int64 CPU tensor of kept dataset indices, sorted ascending, ``M = sum_j n_j``.
    """
    labels = _as_labels(labels)
    _check_generator(generator)
    if labels.numel() == 0:
        raise ValueError("labels is empty: there is nothing to subsample")
    counts = class_counts(labels)
    if bool((counts == 0).any()):  # every quota is at least 1, so no max_count can serve an absent class
        empty = int(torch.nonzero(counts == 0)[0, 0])
        raise ValueError(f"labels has no sample of class {empty} (below the largest label, "
                         f"{counts.numel() - 1}): relabel the classes to 0..C-1 without gaps")
    if max_count is None:
        max_count = int(counts.min())
    quota = long_tailed_counts(counts.numel(), max_count, imbalance_ratio, profile, step_fraction)
    order = torch.argsort(labels, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    kept = []
    for j, n_j in enumerate(quota):
        if n_j > int(counts[j]):
            raise ValueError(
                f"class {j} has {int(counts[j])} samples but the profile asks for {n_j} "
                f"(max_count={max_count}); lower max_count"
            )
        members = order[int(starts[j]):int(starts[j]) + int(counts[j])]
        if generator is not None:
            members = members[torch.randperm(members.numel(), generator=generator)]
        kept.append(members[:n_j])
    return torch.sort(torch.cat(kept)).values


class _ClassMassSampler(Sampler[int]):
    """Shared drawing: class j gets total probability ``class_probabilities[j]``, uniform inside; the ranks'
    slicing of one seeded stream (see the module docstring)."""

    def __init__(self, labels, num_samples: int | None, replacement: bool,
                 generator: torch.Generator | None, num_replicas: int | None = None, rank: int | None = None,
                 seed: int | None = None, drop_last: bool = False) -> None:
        labels = _as_labels(labels)
        if not isinstance(drop_last, bool):
            raise TypeError(f"drop_last must be a bool, got {type(drop_last).__name__}")
        if labels.numel() == 0:
            raise ValueError("labels must hold at least one sample")
        if not isinstance(replacement, bool):
            raise TypeError(f"replacement must be a bool, got {type(replacement).__name__}")
        num_samples = labels.numel() if num_samples is None else check_int("num_samples", num_samples, 1)
        if not replacement and num_samples > labels.numel():
            raise ValueError(
                f"num_samples={num_samples} exceeds the {labels.numel()} samples of labels; "
                "it needs replacement=True"
            )
        self.num_replicas, self.rank = replicas(num_replicas, rank)
        if _check_generator(generator) is not None and (seed is not None or self.num_replicas > 1):
            raise ValueError("generator= is one process's stream; with several ranks (or seed=) the ranks share "
                             "seed= instead")
        self.seed = shared_seed(seed, self.num_replicas)
        self.epoch = 0
        self.labels = labels.clone()  # its own: the caller's tensor edited later would not match the counts
        self.counts = class_counts(labels)  # (a stray huge label refused, not a bincount up to it)
        self.num_samples = num_samples
        # the ranks' equal shares: padded up to a multiple of the ranks (DistributedSampler's default), or with
        # drop_last cut down to one, the tail of the draw dropped
        shares = num_samples // self.num_replicas if drop_last else -(-num_samples // self.num_replicas)
        if shares == 0:
            raise ValueError(f"drop_last=True leaves no index to any rank: num_samples={num_samples} is less than "
                             f"num_replicas={self.num_replicas}")
        self.total_size = shares * self.num_replicas
        self.drop_last = drop_last
        self.replacement = replacement
        self.generator = generator
        self._order = torch.argsort(labels, stable=True)
        self._starts = torch.cumsum(self.counts, 0) - self.counts

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose stream the next iteration draws (``seed + epoch``); call it every epoch, as with
        ``DistributedSampler``. Without a shared seed (one process, no ``seed=``) it has no effect."""
        self.epoch = check_int("epoch", epoch, 0)

    def _set_class_weights(self, per_sample_weight: torch.Tensor) -> None:
        """``per_sample_weight``: (C,) float64, 0 for absent classes; stored normalised over classes."""
        self._class_weights = per_sample_weight / per_sample_weight.sum()
        mass = self._class_weights * self.counts.to(torch.float64)
        self._class_probabilities = mass / mass.sum()

    @property
    def class_weights(self) -> torch.Tensor:
        """(C,) float64: per-sample draw weight of each class, normalised to sum 1 over classes."""
        return self._class_weights.clone()

    @property
    def class_probabilities(self) -> torch.Tensor:
        """(C,) float64: probability that one draw lands in class j (``weight_j * n_j``, normalised)."""
        return self._class_probabilities.clone()

    def __len__(self) -> int:
        return self.total_size // self.num_replicas

    def _draw(self, n: int, g: torch.Generator | None) -> torch.Tensor:
        """``n`` dataset indices (int64)."""
        if self.replacement:
            cls = torch.multinomial(self._class_probabilities, n, True, generator=g)
            count = self.counts[cls]
            offset = (torch.rand(n, generator=g, dtype=torch.float64) * count).long()
            return self._order[self._starts[cls] + torch.minimum(offset, count - 1)]
        weights = self._class_weights[self.labels]
        if n <= self.labels.numel():
            return _without_replacement(weights, n, g)
        # the ranks' equal share needs more indices than there are samples: repeat them from the first (as
        # DistributedSampler pads), as often as it takes (more ranks than twice the samples: several times)
        idx = _without_replacement(weights, self.num_samples, g)
        return idx.repeat(-(-n // self.num_samples))[:n]

    def __iter__(self) -> Iterator[int]:
        if self.seed is None:  # one process, its own generator (or torch's)
            yield from self._draw(self.num_samples, self.generator).tolist()
            return
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        yield from self._draw(self.total_size, g)[self.rank::self.num_replicas].tolist()


MULTINOMIAL_LIMIT = 2**24  # the most categories torch.multinomial draws from without replacement


def _without_replacement(weights: torch.Tensor, n: int, g: torch.Generator | None) -> torch.Tensor:
    """``n`` distinct indices of the positive (M,) float64 ``weights``, drawn one after another with probability
    proportional to the weights of those left, in the order drawn: ``torch.multinomial`` up to its limit of 2^24
    categories; beyond it the same law as an exponential race (Efraimidis and Spirakis: the ``n`` first arrivals
    of independent exponential clocks of rates ``weights``)."""
    if weights.numel() <= MULTINOMIAL_LIMIT:
        return torch.multinomial(weights, n, False, generator=g)
    arrival = torch.empty_like(weights).exponential_(generator=g) / weights
    return torch.topk(arrival, n, largest=False, sorted=True).indices


class ClassBalancedSampler(_ClassMassSampler):
    """Sampler over dataset indices with class mass ``p_j = n_j^q / sum_k n_k^q``.

    Each sample of class j is drawn with probability ∝ ``n_j^q / n_j``: ``q = 0`` class-balanced,
    ``q = 0.5`` square-root, ``q = 1`` instance-balanced (plain shuffling with replacement). Classes absent
    from ``labels`` get no mass. Iterating yields ``num_samples`` dataset indices (Python ints).

    Args:
        labels: (N,) integer labels of the dataset's samples (tensor, sequence or numpy array; not the class counts),
            at least one sample. The ``counts`` attribute has one entry per class up to the largest label.
        q: the exponent of the class mass ``n_j^q`` (finite).
        num_samples: draws per epoch, at least 1; default N.
        replacement: draw with replacement (class first, then a sample uniformly inside it); without
            replacement, one multinomial over the per-sample weights, which needs ``num_samples <= N``. Only the
            first draws then follow ``class_probabilities``: as samples run out the draws drift back towards the
            training frequencies, and ``num_samples = N`` (the default) is a permutation of the dataset, which
            balances nothing whatever ``q``. Keep ``num_samples`` well below N there, or draw with replacement.
        generator: the source of randomness of one process; default torch's global generator.
        num_replicas, rank, seed, drop_last: data parallel, see below.

    Data parallel: ``num_replicas`` ranks (default: the initialised ``torch.distributed`` world, else 1), this one
    ``rank``; each epoch every rank draws ``ceil(num_samples / num_replicas) * num_replicas`` indices from
    ``torch.Generator().manual_seed(seed + epoch)`` and yields every ``num_replicas``-th from position ``rank``
    (``len`` = that count / ``num_replicas``, equal on every rank; without replacement no index is on two ranks,
    unless ``num_samples`` is within ``num_replicas`` of N and the share is padded by repeating indices, as
    ``DistributedSampler``). ``drop_last=True`` (as ``DistributedSampler``'s): ``floor(num_samples /
    num_replicas)`` indices a rank instead, the draw's tail dropped, never padded. ``seed`` must be the same on
    every rank: None draws it on rank 0 and broadcasts it once, here. Call ``set_epoch(epoch)`` every epoch.
    ``seed`` alone (one process) gives the same seeded epochs.
    """

    def __init__(self, labels: torch.Tensor | Sequence[int] | np.ndarray, q: float = 0.0,
                 num_samples: int | None = None, replacement: bool = True,
                 generator: torch.Generator | None = None, *, num_replicas: int | None = None,
                 rank: int | None = None, seed: int | None = None, drop_last: bool = False) -> None:
        self.q = check_finite_float("q", q)
        super().__init__(labels, num_samples, replacement, generator, num_replicas, rank, seed, drop_last)
        n = self.counts.to(torch.float64)
        present = n > 0
        weight = torch.zeros_like(n)
        log_w = (self.q - 1.0) * n[present].log()  # n^(q-1) relative to its largest: no overflow for any q
        weight[present] = (log_w - log_w.max()).exp()
        self._set_class_weights(weight)


class CBENSampler(_ClassMassSampler):
    """GCL's stage-2 sampler (class-balanced by effective number, CBEN) over dataset indices.

    With per-class counts ``n`` (classes present in ``labels`` only):
    ``delta_j = log n_max - log n_j``,
    ``beta_j = b * (delta_j - delta_min) / (delta_max - delta_min) + a`` (``beta_j = a`` when all
    counts are equal), ``rho_j = (1 - beta_j) / (1 - beta_j^n_j)``, normalised over classes
    (``class_weights``, (C,) float64). Each sample of class j is drawn with probability ∝ ``rho_j``.

    Defaults ``a = 0.999, b = 0.0009`` (beta in [0.999, 0.9999]) are what the GCL paper states; the
    official code's sampler uses ``a = 0.9999, b = 1e-5`` and its stage-2 scripts default to plain
    1/n class-balanced sampling (``ClassBalancedSampler(q=0)``). Both a and b are arguments here.
    Draws are always with replacement; iterating yields ``num_samples`` dataset indices (Python ints).

    Args:
        labels: (N,) integer labels (tensor, sequence or numpy array), at least one sample.
        a: the smallest beta (for the most frequent class); requires ``0 <= a < 1``.
        b: the span of beta above ``a``; requires ``b >= 0`` and ``a + b < 1``.
        num_samples: draws per epoch, at least 1; default N.
        generator: the source of randomness of one process; default torch's global generator.
        num_replicas, rank, seed, drop_last: data parallel, as :class:`ClassBalancedSampler` (``set_epoch``
            too).
    """

    def __init__(self, labels: torch.Tensor | Sequence[int] | np.ndarray, a: float = 0.999, b: float = 0.0009,
                 num_samples: int | None = None,
                 generator: torch.Generator | None = None, *, num_replicas: int | None = None,
                 rank: int | None = None, seed: int | None = None, drop_last: bool = False) -> None:
        a = check_finite_float("a", a, min_value=0.0)
        if a >= 1.0:
            raise ValueError(f"a must be < 1, got {a}")
        b = check_finite_float("b", b, min_value=0.0)
        if a + b >= 1.0:
            raise ValueError(f"a + b must be < 1 (beta_j < 1), got a={a}, b={b}")
        self.a, self.b = a, b
        super().__init__(labels, num_samples, True, generator, num_replicas, rank, seed, drop_last)
        n = self.counts.to(torch.float64)
        present = n > 0
        log_n = n[present].log()
        delta = log_n.max() - log_n
        span = delta.max() - delta.min()
        if span > 0:
            beta = b * (delta - delta.min()) / span + a
        else:
            beta = torch.full_like(delta, a)
        rho = torch.zeros_like(n)
        rho[present] = (1.0 - beta) / (1.0 - beta.pow(n[present]))
        self._set_class_weights(rho)


__all__ = [
    "class_counts",
    "long_tailed_counts",
    "long_tailed_indices",
    "ClassBalancedSampler",
    "CBENSampler",
]

"""``fastlt demo``: every method of fastlt on a long-tailed split of scikit-learn's digits, on the CPU.

No GPU and no download: scikit-learn's handwritten digits (1,797 8x8 images, 10 classes) ship inside
the package. Per class, a fixed number of images is held out first as a balanced test set; the rest
is subsampled to a long-tailed training split (exponential profile, imbalance ratio 100 by default:
124, 74, 44, ..., 1 images). Features are standardised with the training split's statistics.

Each method trains the same small MLP (64 -> 128 -> 64 features -> classifier) from the same
initialisation, on the same shuffled batches, with the same optimiser and epoch budget:

- ``CE``: plain cross-entropy, linear classifier.
- ``LA loss``: :class:`fastlt.LogitAdjustedLoss` (tau = 1).
- ``post-hoc LA``: the CE model's logits adjusted with :func:`fastlt.posthoc.logit_adjust` (tau = 1);
  no retraining, so its time is the adjustment and evaluation only.
- ``Balanced Softmax``: :class:`fastlt.BalancedSoftmaxLoss`. With tau = 1 it is the same loss as
  ``LA loss`` (docs/design.md, The losses), so the two rows coincide: that is expected, not a bug.
- ``LDAM``: :class:`fastlt.LDAMLoss` (max margin 0.5, s = 30) on a :class:`fastlt.CosineClassifier`
  head, as the official recipe's normed classifier does (``s * z`` with a plain linear head makes
  the logits 30x too large to train stably). Plain LDAM: no deferred re-weighting.
- ``LADE``: :class:`fastlt.LADELoss` (alpha = 0.1, lambda = 0.1), linear classifier; predicts with
  :func:`fastlt.posthoc.pc_softmax` toward the uniform prior, applied to the source-posterior logits
  ``z + log pi`` (the network is trained through PriorCE), i.e. ``argmax z`` as the official code does;
  ``pc_softmax(z)`` itself (``argmax z - log pi``) would remove the prior twice (seed 0: many-shot accuracy 2%).
- ``GCL``: stage 1 trains backbone + :class:`fastlt.CosineClassifier` with
  :class:`fastlt.GCLLoss` (m = 0, s = 30, noise_mul = 0.5, the official backbone recipe); stage 2
  freezes the backbone and re-trains the classifier on batches drawn by
  :class:`fastlt.data.CBENSampler` with ``GCLLoss(m=0.1, s=20, noise_mul=0.5, gamma=1)``. Predicts
  the argmax of the cosine logits. Its time includes both stages.

Shared budget (tuned on seed 0 for all methods alike, CE included): SGD, momentum 0.9, lr 0.05 with
cosine decay, weight decay 5e-4, batch 32, 60 epochs. Over seeds 0-4 the mean balanced accuracies were
CE 75.8, LA loss / Balanced Softmax 79.8, post-hoc LA 79.6, LDAM 73.9, LADE 80.0, GCL 77.4 (%): the
prior-corrected methods win, plain LDAM (no DRW) does not on this tiny split.

Everything is seeded (data split, initialisation, batch order, samplers, GCL noise) and run with
deterministic algorithms on at most two CPU threads, so a seed gives the same table every time.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from . import posthoc
from .cosine import CosineClassifier
from .data import CBENSampler, class_counts, long_tailed_indices
from .distributed.ranks import SEED_LIMIT
from .functional import adjusted_cross_entropy
from .losses import BalancedSoftmaxLoss, GCLLoss, LADELoss, LDAMLoss, LogitAdjustedLoss
from .metrics import format_report, shot_accuracy
from .priors import log_prior

__all__ = ["run_demo", "main", "METHODS", "DEFAULT_EPOCHS", "Ranks"]

DESCRIPTION = ("Train CE, logit adjustment (loss and post-hoc), Balanced Softmax, LDAM, LADE and GCL on a "
               "long-tailed split of scikit-learn's digits (CPU, no download) and print one report table.")

METHODS = ("CE", "LA loss", "post-hoc LA", "Balanced Softmax", "LDAM", "LADE", "GCL")

DEFAULT_EPOCHS = 60
QUICK_EPOCHS = 2
TEST_PER_CLASS = 50
BATCH_SIZE = 32
LR = 0.05
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
HIDDEN, FEATURES = 128, 64
LDAM_COSINE_HEAD = True  # LDAM's s=30 on a linear head's raw logits trains unstably; see the module doc
GCL_STAGE2_FRACTION = 0.25  # stage-2 epochs as a fraction of the stage-1 budget (at least 1)


@dataclass
class Split:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    counts: torch.Tensor  # (C,) training counts
    num_classes: int


class MissingDependency(ImportError):
    """A package of the ``[demo]`` extra is not installed (``fastlt demo`` says so in one line)."""


def _demo_import(module: str, package: str):
    """``importlib.import_module(module)``, or :class:`MissingDependency` naming ``package`` and the extra that
    brings it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependency(f"the demo needs {package} (pip install 'fastlt[demo]')") from exc


def make_split(seed: int = 0, imbalance_ratio: float = 100.0, test_per_class: int = TEST_PER_CLASS) -> Split:
    """Balanced test set held out first, long-tailed (exp profile) training split of the rest."""
    digits = _demo_import("sklearn.datasets", "scikit-learn").load_digits()
    x = torch.as_tensor(digits.data, dtype=torch.float32)
    y = torch.as_tensor(digits.target, dtype=torch.int64)
    g = torch.Generator().manual_seed(seed)
    num_classes = int(y.max()) + 1
    test_idx, pool_idx = [], []
    for c in range(num_classes):
        members = torch.nonzero(y == c).flatten()
        members = members[torch.randperm(members.numel(), generator=g)]
        if members.numel() <= test_per_class:
            raise ValueError(f"class {c} has {members.numel()} images, too few to hold out {test_per_class}")
        test_idx.append(members[:test_per_class])
        pool_idx.append(members[test_per_class:])
    test_idx = torch.sort(torch.cat(test_idx)).values
    pool_idx = torch.sort(torch.cat(pool_idx)).values
    # max_count defaults to the smallest pool class, so every class can fill its quota.
    keep = long_tailed_indices(y[pool_idx], imbalance_ratio, profile="exp", generator=g)
    train_idx = pool_idx[keep]
    x_train, y_train = x[train_idx], y[train_idx]
    mean = x_train.mean(0)
    std = x_train.std(0)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))  # constant pixels (the border) stay 0
    return Split(
        x_train=(x_train - mean) / std,
        y_train=y_train,
        x_test=(x[test_idx] - mean) / std,
        y_test=y[test_idx],
        counts=class_counts(y_train, num_classes),
        num_classes=num_classes,
    )


@dataclass
class Ranks:
    """How the demo's training is split over data-parallel ranks; the defaults are one process (the command
    ``fastlt demo``). :mod:`fastlt.ddp_demo` runs the same training under ``torchrun`` with ``dp_group`` set, DDP
    wrapping the model, and each global batch split into contiguous per-rank parts."""

    group: object = None  # the losses' dp_group
    rank: int = 0
    size: int = 1

    def wrap(self, model: nn.Module) -> nn.Module:
        """The model as trained (DDP under several ranks)."""
        return model

    def rows(self, idx: torch.Tensor) -> tuple[torch.Tensor, int]:
        """This rank's contiguous part of a global batch and the per-rank batch size (rank r holds rows
        ``r * per ...``, so GCL's noise rows are the single process's)."""
        per = -(-idx.numel() // self.size)
        return idx[self.rank * per:(self.rank + 1) * per], per


class Net(nn.Module):
    """MLP backbone (64 -> 128 -> 64, ReLU) and a linear or cosine classifier head."""

    def __init__(self, in_features: int, num_classes: int, cosine: bool = False):
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Linear(in_features, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, FEATURES), nn.ReLU()
        )
        self.head = CosineClassifier(FEATURES, num_classes) if cosine else nn.Linear(FEATURES, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def _bar(total: int, desc: str, progress: bool):
    tqdm = _demo_import("tqdm.auto", "tqdm").tqdm
    # disable=None: shown on a terminal, silent when stderr is not a TTY (logs, CI, pytest).
    return tqdm(total=total, desc=desc, file=sys.stderr, leave=False, unit="step", dynamic_ncols=True,
                disable=None if progress else True)


def _batches(n: int, epochs: int, generator: torch.Generator):
    """Index batches of a fresh shuffle per epoch (drop nothing: the last batch may be short)."""
    for _ in range(epochs):
        perm = torch.randperm(n, generator=generator)
        yield from perm.split(BATCH_SIZE)


def _sgd(params, epochs_steps: int):
    opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs_steps))
    return opt, sched


def _fit(model: nn.Module, params, criterion, x: torch.Tensor, y: torch.Tensor, batches: list[torch.Tensor],
         desc: str, progress: bool, ranks: Ranks = Ranks(), split: bool = True) -> None:
    """SGD over ``batches`` (global batches, split over ``ranks`` when ``split``; else already this rank's)."""
    opt, sched = _sgd(params, len(batches))
    model.train()
    with _bar(len(batches), desc, progress) as bar:
        for idx in batches:
            if ranks.size > 1:
                idx, per = ranks.rows(idx) if split else (idx, BATCH_SIZE // ranks.size)
                if hasattr(criterion, "rows_per_rank"):
                    criterion.rows_per_rank = per
            loss = criterion(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)


@torch.no_grad()
def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model(x)


def _run(seed: int, epochs: int, imbalance_ratio: float, progress: bool,
         ranks: Ranks = Ranks()) -> tuple[dict[str, dict], Split]:
    split = make_split(seed, imbalance_ratio)
    dp = {} if ranks.size == 1 else dict(dp_group=ranks.group)
    counts = split.counts
    n, d = split.x_train.shape
    C = split.num_classes
    x, y = split.x_train, split.y_train
    # One batch order for every method (same budget, same data); GCL's stage 2 has its own sampler.
    batches = list(_batches(n, epochs, torch.Generator().manual_seed(seed + 1)))

    def fresh(cosine: bool) -> Net:
        torch.manual_seed(seed + 2)  # same initial backbone for every method
        return Net(d, C, cosine=cosine)

    def evaluate(scores: torch.Tensor) -> dict:
        return shot_accuracy(scores, split.y_test, counts)

    rows: dict[str, dict] = {}

    def train_and_eval(name: str, criterion, cosine: bool = False, predict=None) -> nn.Module:
        t0 = time.perf_counter()
        model = ranks.wrap(fresh(cosine))
        _fit(model, model.parameters(), criterion, x, y, batches, name, progress, ranks)
        scores = _logits(model, split.x_test)
        if predict is not None:
            scores = predict(scores)
        rows[name] = {**evaluate(scores), "time_s": time.perf_counter() - t0}
        return model

    ce = nn.CrossEntropyLoss() if ranks.size == 1 else partial(adjusted_cross_entropy, **dp)
    ce_model = train_and_eval("CE", ce)
    train_and_eval("LA loss", LogitAdjustedLoss(counts, tau=1.0, **dp))

    t0 = time.perf_counter()  # post-hoc LA: the CE model, no retraining
    scores = posthoc.logit_adjust(_logits(ce_model, split.x_test), counts, tau=1.0)
    rows["post-hoc LA"] = {**evaluate(scores), "time_s": time.perf_counter() - t0}

    train_and_eval("Balanced Softmax", BalancedSoftmaxLoss(counts, **dp))
    train_and_eval("LDAM", LDAMLoss(counts, max_margin=0.5, s=30.0, **dp), cosine=LDAM_COSINE_HEAD)
    # LADE's network is trained through PriorCE, so its source-posterior logits are z + log pi; PC Softmax
    # of those toward the uniform prior is softmax(z) (the official code predicts argmax(z + log p_t)).
    # pc_softmax(z, counts) itself, i.e. argmax(z - log pi), would remove the prior twice.
    log_pi = log_prior(counts)
    train_and_eval("LADE", LADELoss(counts, alpha=0.1, remine_lambda=0.1, **dp),
                   predict=lambda z: posthoc.pc_softmax(z + log_pi, counts))

    # GCL, two stages.
    t0 = time.perf_counter()
    net = fresh(cosine=True)
    model = ranks.wrap(net)
    torch.manual_seed(seed + 3)  # the GCL noise seeds come from torch's generator (alike on every rank)
    _fit(model, model.parameters(), GCLLoss(counts, m=0.0, s=30.0, noise_mul=0.5, **dp), x, y, batches,
         "GCL stage 1", progress, ranks)
    for p in net.backbone.parameters():
        p.requires_grad_(False)
    model = ranks.wrap(net)  # DDP again: it reduces only the parameters that still train
    stage2_epochs = max(1, round(epochs * GCL_STAGE2_FRACTION))
    if ranks.size == 1:
        sampler = CBENSampler(y, num_samples=n * stage2_epochs, generator=torch.Generator().manual_seed(seed + 4))
    else:  # one seeded stream sliced per rank: the ranks' i-th batches make up one global batch
        sampler = CBENSampler(y, num_samples=n * stage2_epochs, num_replicas=ranks.size, rank=ranks.rank,
                              seed=(seed + 4) % SEED_LIMIT)  # (the shared seed's range: a negative --seed too)
    stage2 = list(torch.tensor(list(sampler), dtype=torch.int64).split(BATCH_SIZE // ranks.size))
    _fit(model, net.head.parameters(), GCLLoss(counts, m=0.1, s=20.0, noise_mul=0.5, gamma=1.0, **dp), x, y,
         stage2, "GCL stage 2", progress, ranks, split=False)
    rows["GCL"] = {**evaluate(_logits(model, split.x_test)), "time_s": time.perf_counter() - t0}

    return {name: rows[name] for name in METHODS}, split


@contextlib.contextmanager
def _repeatable_cpu(threads: int):
    """At most ``threads`` CPU threads and deterministic algorithms; restored (and torch's RNG) after."""
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)
        torch.set_num_threads(old_threads)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# (check, what it asks for) of each option, shared by run_demo's arguments and the command line's
_SEED = (lambda v: _is_int(v) and -(2**63) <= v < 2**64 - 4,  # the demo seeds its streams with seed + 1 ... seed + 4
         "an int in [-2^63, 2^64 - 4) (torch.manual_seed's range, less the demo's four offsets)")
_EPOCHS = (lambda v: _is_int(v) and v >= 1, "an int >= 1")
_RATIO = (lambda v: isinstance(v, (int, float)) and math.isfinite(v) and v >= 1,
          "a finite number >= 1")


def _demo(seed: int, epochs: int | None, imbalance_ratio: float, quick: bool, progress: bool,
          ranks: Ranks = Ranks()):
    if epochs is None:
        epochs = QUICK_EPOCHS if quick else DEFAULT_EPOCHS
    for name, value, (ok, what) in (("seed", seed, _SEED), ("epochs", epochs, _EPOCHS),
                                    ("imbalance_ratio", imbalance_ratio, _RATIO)):
        if not ok(value):
            raise ValueError(f"{name} must be {what}, got {value!r}")
    with _repeatable_cpu(max(1, min(2, os.cpu_count() or 1) // ranks.size)):
        return _run(seed, epochs, float(imbalance_ratio), progress, ranks)


def run_demo(seed: int = 0, epochs: int | None = None, imbalance_ratio: float = 100.0, quick: bool = False,
             progress: bool = True) -> dict[str, dict]:
    """Train and evaluate every method; returns ``{method: shot_accuracy(...) | {'time_s': s}}``.

    ``epochs``: training epochs per method (GCL's stage 2 adds a quarter of that), default
    ``DEFAULT_EPOCHS`` (``QUICK_EPOCHS`` with ``quick=True``, a run of a few seconds for tests).
    ``progress``: tqdm bars on stderr (shown only when stderr is a terminal).
    """
    return _demo(seed, epochs, imbalance_ratio, quick, progress)[0]


def header(split: Split, imbalance_ratio: float, epochs: int) -> str:
    counts = split.counts.tolist()
    return (
        f"digits-LT (scikit-learn digits), imbalance ratio {imbalance_ratio:g} (exp profile), "
        f"{epochs} epochs\ntrain counts per class: {counts} (N={sum(counts)}); "
        f"test: {split.y_test.numel() // split.num_classes} per class (balanced, N={split.y_test.numel()})"
    )


def _option(kind, rule):
    """An argparse ``type=`` that converts with ``kind`` and rejects values failing ``rule`` (``_SEED``, ...) with a
    usage error (exit status 2, no traceback)."""
    check, what = rule

    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return convert


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=_option(int, _SEED), default=0, help="random seed (default 0)")
    parser.add_argument("--epochs", type=_option(int, _EPOCHS), default=None,
                        help=f"training epochs per method (default {DEFAULT_EPOCHS}, {QUICK_EPOCHS} with --quick)")
    parser.add_argument("--imbalance-ratio", type=_option(float, _RATIO), default=100.0,
                        help="n_max / n_min of the training split (default 100)")
    parser.add_argument("--quick", action="store_true", help="a tiny run (a few seconds), for tests")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run_from_args(args: argparse.Namespace, ranks: Ranks = Ranks()) -> int:
    epochs = args.epochs if args.epochs is not None else (QUICK_EPOCHS if args.quick else DEFAULT_EPOCHS)
    t0 = time.perf_counter()
    rows, split = _demo(args.seed, epochs, args.imbalance_ratio, args.quick, not args.no_progress, ranks)
    if ranks.rank != 0:
        return 0
    print(header(split, args.imbalance_ratio, epochs))
    print(format_report(rows))
    where = (f"{min(2, os.cpu_count() or 1)} CPU thread(s)" if ranks.size == 1 else
             f"{ranks.size} data-parallel ranks (gloo), the losses' dp_group set")
    print(f"total wall time {time.perf_counter() - t0:.1f} s on {where}. "
          "Notes: post-hoc LA reuses the CE model (its time is the adjustment only);\n"
          "LA loss (tau=1) and Balanced Softmax are the same loss, so their rows coincide; "
          "GCL's time covers both stages.")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastlt demo", description=DESCRIPTION)
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

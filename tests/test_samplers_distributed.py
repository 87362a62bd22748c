"""The samplers under data parallelism, in one process with explicit ``num_replicas`` / ``rank`` / ``seed``."""

import pytest
import torch

from fastlt.data import CBENSampler, ClassBalancedSampler

pytestmark = pytest.mark.distributed

LABELS = torch.tensor([0] * 30 + [1] * 9 + [2] * 4 + [3] * 1 + [4] * 6)  # 50 samples, long-tailed


def _ranks(cls, world, **kw):
    return [cls(LABELS, num_replicas=world, rank=r, seed=123, **kw) for r in range(world)]


@pytest.mark.parametrize("cls,kw", [(ClassBalancedSampler, dict(q=0.0)), (ClassBalancedSampler, dict(q=0.5)),
                                    (CBENSampler, {})])
@pytest.mark.parametrize("world,num_samples", [(2, 50), (3, 50), (3, 7)])
def test_ranks_partition_one_seeded_draw(cls, kw, world, num_samples):
    """Equal lengths ceil(num_samples / W); interleaved, the ranks' indices are exactly one process's draw of
    ceil(num_samples / W) * W with the same seed; set_epoch gives the next seeded stream, the same on every rank."""
    samplers = _ranks(cls, world, num_samples=num_samples, **kw)
    per = -(-num_samples // world)
    for epoch in (0, 3):
        for s in samplers:
            s.set_epoch(epoch)
        draws = [list(s) for s in samplers]
        assert all(len(d) == per == len(s) for d, s in zip(draws, samplers, strict=True))
        one = cls(LABELS, num_samples=per * world, seed=123 + epoch, **kw)
        merged = [draws[r][i] for i in range(per) for r in range(world)]
        assert merged == list(one)
    samplers[0].set_epoch(0)
    again = list(samplers[0])
    samplers[0].set_epoch(1)
    assert list(samplers[0]) != again
    samplers[0].set_epoch(0)
    assert list(samplers[0]) == again  # an epoch's stream is a function of (seed, epoch) only


@pytest.mark.parametrize("world,num_samples", [(2, 50), (5, 45), (3, 49)])
def test_without_replacement_no_index_on_two_ranks(world, num_samples):
    """replacement=False: the ranks' indices are disjoint and distinct (padding repeats indices only when
    ceil(num_samples / W) * W exceeds the dataset: (3, 49) -> 51 > 50)."""
    draws = [list(s) for s in _ranks(ClassBalancedSampler, world, num_samples=num_samples, replacement=False)]
    flat = [i for d in draws for i in d]
    total = -(-num_samples // world) * world
    if total <= LABELS.numel():
        assert len(set(flat)) == len(flat) == total
    else:
        assert len(set(flat)) == num_samples and len(flat) == total


@pytest.mark.parametrize("labels,world", [([0, 1], 5), ([0], 3), ([0, 0, 1], 8)])
def test_more_ranks_than_twice_the_samples_each_get_their_share(labels, world):
    """Without replacement, padding to W shares repeated the draw once only: with W > 2 N some ranks got fewer
    indices than len() (2 samples on 5 ranks: 1, 1, 1, 1, 0), so DDP's ranks ran different numbers of steps."""
    draws = [list(ClassBalancedSampler(labels, replacement=False, num_replicas=world, rank=r, seed=0))
             for r in range(world)]
    per = -(-len(labels) // world)
    assert [len(d) for d in draws] == [per] * world
    assert sorted(set(i for d in draws for i in d)) == list(range(len(labels)))


def test_class_balance_survives_the_split():
    """q=0 over many draws: each rank sees every class about equally often."""
    s0, s1 = (ClassBalancedSampler(LABELS, num_samples=20000, num_replicas=2, rank=r, seed=5) for r in range(2))
    for s in (s0, s1):
        freq = torch.bincount(LABELS[list(s)], minlength=5).double() / len(s)
        assert torch.allclose(freq, torch.full((5,), 0.2, dtype=torch.float64), atol=0.02)


def test_single_process_behaviour_is_unchanged():
    """No num_replicas, no seed, no process group: the generator's stream, num_samples long, as before."""
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    a = ClassBalancedSampler(LABELS, num_samples=9, generator=g1)
    b = ClassBalancedSampler(LABELS, num_samples=9, generator=g2)
    assert len(a) == 9 and list(a) == list(b) and a.num_replicas == 1 and a.seed is None


def test_bad_arguments():
    with pytest.raises(ValueError, match="rank"):
        ClassBalancedSampler(LABELS, num_replicas=2, rank=2, seed=0)
    with pytest.raises(ValueError, match="rank="):
        ClassBalancedSampler(LABELS, num_replicas=2, seed=0)
    with pytest.raises(ValueError, match="seed="):
        ClassBalancedSampler(LABELS, num_replicas=2, rank=0)
    with pytest.raises(ValueError, match="num_replicas"):
        CBENSampler(LABELS, num_replicas=0, rank=0, seed=0)
    with pytest.raises(ValueError, match="generator"):
        ClassBalancedSampler(LABELS, num_replicas=2, rank=0, seed=0, generator=torch.Generator())
    with pytest.raises(ValueError, match="seed"):
        ClassBalancedSampler(LABELS, seed=-1)
    with pytest.raises(TypeError, match="num_replicas"):
        ClassBalancedSampler(LABELS, num_replicas=2.0, rank=0, seed=0)
    with pytest.raises(ValueError, match="epoch"):
        ClassBalancedSampler(LABELS, seed=0).set_epoch(-1)


@pytest.mark.parametrize("cls,kw", [(ClassBalancedSampler, dict(replacement=False)), (CBENSampler, {})])
@pytest.mark.parametrize("world,num_samples", [(2, 49), (3, 50), (4, 50)])
def test_drop_last_gives_floor_shares_of_one_draw_and_never_pads(cls, kw, world, num_samples):
    """drop_last=True (DistributedSampler's): floor(num_samples / W) indices a rank, interleaving to one process's
    seeded draw of that many, the tail dropped: without replacement, distinct indices (num_samples 49 of 50 with 2
    ranks padded a repeated index before)."""
    samplers = _ranks(cls, world, num_samples=num_samples, drop_last=True, **kw)
    per = num_samples // world
    draws = [list(s) for s in samplers]
    assert all(len(d) == per == len(s) for d, s in zip(draws, samplers, strict=True))
    merged = [draws[r][i] for i in range(per) for r in range(world)]
    assert merged == list(cls(LABELS, num_samples=per * world, seed=123, **kw))
    if cls is ClassBalancedSampler:
        assert len(set(merged)) == len(merged)
    padded = _ranks(cls, world, num_samples=num_samples, **kw)  # the default: ceil, padded
    assert len(padded[0]) == -(-num_samples // world)


def test_drop_last_is_checked():
    assert len(ClassBalancedSampler(LABELS, num_samples=9, drop_last=True)) == 9  # one process: nothing to drop
    with pytest.raises(ValueError, match="drop_last=True leaves no index"):
        ClassBalancedSampler(LABELS, num_samples=2, num_replicas=3, rank=0, seed=0, drop_last=True)
    with pytest.raises(TypeError, match="drop_last must be a bool"):
        CBENSampler(LABELS, drop_last=1)

"""Launchers run on their tensors' GPU (Triton launches on the current CUDA device): the guard's mechanism with
CUDA's device calls faked on the CPU, every launcher the glue calls wrapped, and on a machine with two GPUs a loss
step on ``cuda:1`` while ``cuda:0`` is current."""

from __future__ import annotations

import contextlib

import pytest
import torch

from fastlt.kernels import device_guard, lade, launch, row_normalize

LAUNCHERS = [launch.forward, launch.grad, launch.reduce, launch.combine_partials, launch.loss,
             launch.inv_denominator_of, launch.chunk_partials, launch.scale_by, launch.scale_all,
             lade.merge_partials, lade.finish, lade.forward, lade.forward_flat,
             row_normalize.normalize_rows, row_normalize.normalize_rows_backward]


def test_every_launcher_the_glue_calls_runs_on_its_tensors_device():
    assert all(getattr(fn, "on_its_device", False) for fn in LAUNCHERS), [
        fn.__name__ for fn in LAUNCHERS if not getattr(fn, "on_its_device", False)]


@pytest.mark.parametrize("current", [0, 1])
def test_the_guard_makes_the_tensors_device_current(monkeypatch, current):
    """Tensors on cuda:1: with cuda:0 current the launcher runs inside ``torch.cuda.device(cuda:1)``; with cuda:1
    current it runs as it is (no guard: one comparison). CUDA faked on the CPU."""
    entered = []

    @contextlib.contextmanager
    def device(dev):
        entered.append(dev)
        yield

    class OnSecondGPU(torch.Tensor):  # what a launcher reads of a tensor on cuda:1
        is_cuda = True
        device = torch.device("cuda", 1)

        def get_device(self):
            return 1

    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
    monkeypatch.setattr(torch.cuda, "device", device)
    seen = []
    wrapped = device_guard.on_its_device(lambda z, k=0: seen.append((list(entered), k)) or "done")
    z = torch.zeros(1).as_subclass(OnSecondGPU)
    assert wrapped(z, k=3) == "done"
    assert wrapped([z], k=4) == "done"  # (a list of tensors first: scale_all's gradients)
    want = [torch.device("cuda", 1)] if current == 0 else []
    assert seen == [(want, 3), (want * 2, 4)]


def test_the_device_is_the_first_tensors():
    a, b = torch.zeros(1), torch.zeros(1, device="meta")
    assert device_guard._first_tensor((3, b, a)).device == b.device
    assert device_guard._first_tensor(([b, a], a)).device == b.device
    assert device_guard._first_tensor((1, "x")) is None


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_step_on_the_second_gpu_while_the_first_is_current():
    import fastlt
    from fastlt import reference as R

    torch.cuda.set_device(0)
    counts = [50, 20, 5, 1, 1, 3]
    z = torch.randn(8, 6, device="cuda:1", requires_grad=True)
    y = torch.randint(0, 6, (8,), device="cuda:1")
    crit = fastlt.LogitAdjustedLoss(counts, backend="triton").to("cuda:1")
    loss = crit(z, y)
    loss.backward()
    zr = z.detach().clone().requires_grad_()
    want = R.logit_adjusted_cross_entropy(zr, y, crit.log_prior)
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z.grad, zr.grad, rtol=1e-5, atol=1e-6)

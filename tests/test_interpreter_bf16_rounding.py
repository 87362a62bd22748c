"""fp32 -> bf16 in a Triton kernel rounds to nearest, ties to even, as torch does: natively on a GPU (``cvt.rn``), and
in the CPU interpreter through the patch in ``conftest.py`` (the interpreter truncates by itself), so the bf16
kernel tests see the GPU's roundings."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from conftest import DEVICE, HAS_CUDA, INTERPRETER_BF16_TO_NEAREST


@triton.jit
def _to_bf16(x_ptr, cast_ptr, store_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    tl.store(cast_ptr + offs, x.to(tl.bfloat16), mask=mask)  # an explicit cast
    tl.store(store_ptr + offs, x, mask=mask)  # a store's implicit one


def test_fp32_to_bf16_rounds_to_nearest_even_as_torch():
    assert HAS_CUDA or INTERPRETER_BF16_TO_NEAREST  # (the patch applies to every Triton CI runs)
    one = 1.0 + 2.0**-8  # halfway between 1 and the next bf16: a tie, to even (1.0)
    values = [one, 1.0 + 3 * 2.0**-8, 1.0 + 2.0**-8 + 2.0**-20, 2.0 - 2.0**-9, -(1.0 + 2.0**-7 + 2.0**-9),
              3.3895e38, float("inf"), float("-inf"), float("nan"), 0.0, -0.0, 1e-40, 0.1, -7.77]
    gen = torch.Generator().manual_seed(3)
    x = torch.cat([torch.tensor(values), torch.randn(1000, generator=gen) * 100]).to(DEVICE)
    cast = torch.empty(x.numel(), dtype=torch.bfloat16, device=DEVICE)
    stored = torch.empty_like(cast)
    _to_bf16[(1,)](x, cast, stored, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
    want = x.to(torch.bfloat16)
    for got in (cast, stored):
        same = (got.view(torch.int16) == want.view(torch.int16)) | (got.isnan() & want.isnan())
        assert bool(same.all()), (x[~same].tolist()[:5], got[~same].tolist()[:5], want[~same].tolist()[:5])

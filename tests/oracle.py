"""Error-relative-to-reference checks (docs/design.md, Tests): a kernel result passes when its error against the
float64 reference is at most ``factor`` times the error of the same-dtype PyTorch reference, plus an
absolute floor scaled by the magnitude of the reference."""

from __future__ import annotations

import torch

# absolute floors, relative to max(1, |reference|): the rounding of one value in that dtype
FLOOR = {torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def assert_oracle_close(got: torch.Tensor, ref64: torch.Tensor, ref_same: torch.Tensor, dtype: torch.dtype,
                        *, factor: float = 2.0, what: str = "value", roundings: int = 1) -> None:
    """``roundings``: how many roundings to ``dtype`` the floor allows (2 where the kernel rounds an intermediate
    to the dtype on purpose, as the gradient in the forward's stored ``exp(a - max)``)."""
    got64 = got.detach().to(torch.float64).cpu()
    ref64 = ref64.detach().to(torch.float64).cpu()
    same64 = ref_same.detach().to(torch.float64).cpu()
    assert got64.shape == ref64.shape, f"{what}: shape {tuple(got64.shape)} != {tuple(ref64.shape)}"
    assert torch.isnan(got64).eq(torch.isnan(ref64)).all(), f"{what}: NaN pattern differs from the reference"
    finite = ~torch.isnan(ref64)
    if not finite.any():
        return
    err = (got64 - ref64)[finite].abs().max().item()
    # where the same-dtype reference overflowed (fp16 at s = 30, say) it bounds nothing: the floor alone applies there
    both = finite & torch.isfinite(same64)
    base = (same64 - ref64)[both].abs().max().item() if both.any() else 0.0
    scale = max(1.0, ref64[finite].abs().max().item())
    bound = factor * base + roundings * FLOOR[dtype] * scale
    assert err <= bound, f"{what}: error {err:.3e} > bound {bound:.3e} (same-dtype reference error {base:.3e})"

"""The low-precision pass rule of the GPU tier (DESIGN.md convention 9), shared by every kernel test.

A kernel output in a low-precision dtype passes when its max error against the float32 reference is at most
twice the max error of plain PyTorch doing the same computation in that dtype, plus a small floor.
"""
import torch


def assert_close_to_reference(out: torch.Tensor, ref32: torch.Tensor, plain: torch.Tensor, *, floor: float = 1e-4,
                              name: str = "output") -> None:
    """``out``: the kernel's result; ``ref32``: the fp32 reference; ``plain``: plain PyTorch in out's dtype."""
    err = (out.double() - ref32.double()).abs().max().item()
    plain_err = (plain.double() - ref32.double()).abs().max().item()
    bound = 2 * plain_err + floor
    assert err <= bound, (f"{name}: max error {err:.3e} vs fp32 reference exceeds 2 x plain PyTorch's error "
                          f"({plain_err:.3e}) + {floor:g} = {bound:.3e}")

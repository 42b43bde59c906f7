"""gemv.RowReduction: one-row float32 CPU products of row-major weights become reductions inside inductor, with
the values of the matrix product; other products are left to the matmul."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from loramix.gemv import RowReduction


class Linears(nn.Module):
    """A wide linear with a bias and a narrow one without, as a decoder block's MLP has them."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(24, 56)
        self.down = nn.Linear(56, 24, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


def compiled(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, RowReduction]:
    torch._dynamo.reset()
    rows = RowReduction()
    options = {"freezing": True, "cpp.weight_prepack": False, "post_grad_custom_post_pass": rows}
    # caches off: a graph served from inductor's on-disk cache never reaches the pass, which then counts nothing
    with torch.no_grad(), torch._inductor.config.patch(freezing=True, force_disable_caches=True):
        out = torch.compile(module, fullgraph=True, dynamic=False, options=options)(x)
    return out, rows


@pytest.fixture
def module() -> nn.Module:
    torch.manual_seed(0)
    return Linears().eval().requires_grad_(False)


def test_one_row_products_become_reductions_with_the_same_values(module):
    x = torch.randn(1, 1, 24)
    out, rows = compiled(module, x)
    assert rows.rewritten == 2  # both linears
    torch.testing.assert_close(out, module(x), rtol=1e-5, atol=1e-5)


def test_products_of_several_rows_and_transposed_weights_stay_matmuls(module):
    x = torch.randn(3, 24)
    out, rows = compiled(module, x)
    assert rows.rewritten == 0
    torch.testing.assert_close(out, module(x), rtol=1e-5, atol=1e-5)
    module.up.weight.data = module.up.weight.data.t().contiguous().t()  # layout.py's in-features-major layout
    one = x[:1]
    out, rows = compiled(module, one)
    assert rows.rewritten == 1  # only down, row-major
    torch.testing.assert_close(out, module(one), rtol=1e-5, atol=1e-5)


def test_the_pass_keys_the_compile_cache():
    assert RowReduction().uuid() == RowReduction().uuid() and RowReduction().uuid()

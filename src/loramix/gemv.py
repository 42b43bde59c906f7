"""One-row matrix products as reductions, for inductor on a CPU.

A batch-1 decode step is matrix-vector products: every weight is read once per token, so the step runs at the speed
the weights stream from memory. MKL's `sgemm` with one row streams them at 8-12 GB/s on the machine of
benchmarks/RESULTS.md (an AMD EPYC, 2 threads); the same product written as a product and a sum over the input
features, which inductor fuses into one vectorised reduction that reads each row-major weight row once, streams them
at 18-28 GB/s, 1.9-2.6x faster (RESULTS.md, "One-row products as reductions, and plain attention in the compiled
step"; benchmarks/row_products.py). `RowReduction` is the inductor graph pass that
rewrites them: every float32 CPU `mm`/`addmm` whose left operand has one row and whose right operand is a weight
stored row-major (its [K, N] view is in-features-contiguous, as `nn.Linear` keeps it) becomes `sum(x^T * W^T, 0)`.
Products of more rows stay matrix multiplies (a reduction would read the weight once per row), and so do weights
stored in-features-major (layout.py's transposed layout), which MKL reads faster than a reduction would.
"""

from __future__ import annotations

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

__all__ = ["RowReduction"]

_aten = torch.ops.aten


def _one_row_product(node: torch.fx.Node) -> tuple[torch.fx.Node | None, torch.fx.Node, torch.fx.Node] | None:
    """(bias or None, x, w) when `node` is an `mm`/`addmm` that `RowReduction` rewrites, else None."""
    if node.op != "call_function" or node.kwargs:
        return None
    if node.target is _aten.mm.default:
        bias, (x, w) = None, node.args
    elif node.target is _aten.addmm.default:
        bias, x, w = node.args
    else:
        return None
    xv, wv = x.meta.get("val"), w.meta.get("val")
    if not isinstance(xv, torch.Tensor) or not isinstance(wv, torch.Tensor):
        return None
    if xv.shape[0] != 1 or xv.device.type != "cpu" or xv.dtype != torch.float32 or wv.dtype != torch.float32:
        return None
    if wv.stride(0) != 1 and wv.shape[0] != 1:  # the reduction runs over w's rows: they must be contiguous
        return None
    if bias is not None and not isinstance(bias.meta.get("val"), torch.Tensor):
        return None
    return bias, x, w


class RowReduction(CustomGraphPass):
    """An inductor post-grad pass (`post_grad_custom_post_pass`): one-row float32 CPU matrix products of row-major
    weights as fused reductions (module docstring). Its `uuid` keys inductor's on-disk cache, so a compiled step
    that used it is cached apart from one that did not. `rewritten` counts the products it has rewritten."""

    def __init__(self) -> None:
        self.rewritten = 0

    def __call__(self, graph: torch.fx.Graph) -> None:
        for node in list(graph.nodes):
            found = _one_row_product(node)
            if found is None:
                continue
            bias, x, w = found
            fake = torch._guards.detect_fake_mode([x.meta["val"]])
            with graph.inserting_before(node):
                xt = graph.call_function(_aten.permute.default, (x, [1, 0]))
                product = graph.call_function(_aten.mul.Tensor, (xt, w))
                out = summed = graph.call_function(_aten.sum.dim_IntList, (product, [0], True))
                if bias is not None:
                    out = graph.call_function(_aten.add.Tensor, (summed, bias))
            with fake if fake is not None else torch._subclasses.FakeTensorMode():
                xt.meta["val"] = x.meta["val"].permute(1, 0)
                product.meta["val"] = xt.meta["val"] * w.meta["val"]
                summed.meta["val"] = product.meta["val"].sum([0], keepdim=True)
                if bias is not None:
                    out.meta["val"] = summed.meta["val"] + bias.meta["val"]
            node.replace_all_uses_with(out)
            graph.erase_node(node)
            self.rewritten += 1
        graph.lint()

    def uuid(self) -> bytes:
        return get_hash_for_files((__file__,))

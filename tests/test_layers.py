import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from loramix.experts import StackedLoRA
from loramix.layers import MixedLoRALinear, MixState


def _experts(d_in, d_out, ranks, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    As = [torch.randn(r, d_in, generator=g) for r in ranks]
    Bs = [torch.randn(d_out, r, generator=g) for r in ranks]
    scales = [0.5 * (i + 1) for i in range(len(ranks))]
    return As, Bs, scales


def _stack(As, Bs, ranks, scales, dtype=torch.float32):
    return StackedLoRA(
        torch.cat([a for a, r in zip(As, ranks) if r], 0).to(dtype),
        torch.cat([b for b, r in zip(Bs, ranks) if r], 1).to(dtype),
        list(ranks),
        [s if r else 0.0 for s, r in zip(scales, ranks)],
    )


def _reference(base, x, As, Bs, scales, s, g):
    """The method, written as the loop over experts that the stacked form replaces."""
    y = base(x)
    for e, (a, b, c) in enumerate(zip(As, Bs, scales)):
        if a.shape[0] == 0:
            continue
        y = y + g * s[..., e : e + 1] * c * (x @ a.T @ b.T)
    return y


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_stacked_forward_equals_the_sum_over_experts(kind):
    torch.manual_seed(0)
    d_in, d_out, ranks = 12, 20, [3, 0, 5, 2]  # expert 1 does not adapt this module
    base = nn.Linear(d_in, d_out) if kind == "linear" else Conv1D(d_out, d_in)
    As, Bs, scales = _experts(d_in, d_out, ranks)
    state = MixState(global_scaling_weight=0.7)
    layer = MixedLoRALinear(base, _stack(As, Bs, ranks, scales), layer_index=1, state=state)
    x = torch.randn(2, 5, d_in)
    scalings = torch.rand(2, 5, 3, 4)  # [B, T, L, N]; this is layer 1
    with state.use(scalings):
        got = layer(x)
    want = _reference(base, x, As, Bs, scales, scalings[:, :, 1], 0.7)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with state.use(0.3):  # a constant (the scaling pass's dummy value)
        got = layer(x)
    torch.testing.assert_close(got, _reference(base, x, As, Bs, scales, torch.full((2, 5, 4), 0.3), 0.7))


@pytest.mark.parametrize("path", ["training", "base-in-another-dtype"])
def test_every_forward_path_computes_the_method(path):
    """The gradient path (gate training) and the out-of-place path (a base whose dtype differs from the experts')
    give the same values as the method, and training gets the reference gradient of the scalings."""
    torch.manual_seed(1)
    d_in, d_out, ranks = 12, 20, [3, 0, 5, 2]
    base = nn.Linear(d_in, d_out).to(torch.float64 if path == "base-in-another-dtype" else torch.float32)
    As, Bs, scales = _experts(d_in, d_out, ranks)
    state = MixState(global_scaling_weight=0.7)
    layer = MixedLoRALinear(base, _stack(As, Bs, ranks, scales), layer_index=1, state=state)
    x = torch.randn(2, 5, d_in, dtype=base.weight.dtype)
    scalings = torch.rand(2, 5, 3, 4, dtype=torch.float32, requires_grad=path == "training")
    with state.use(scalings):
        got = layer(x)
    assert got.dtype == base.weight.dtype
    reference = scalings.detach().clone().requires_grad_(path == "training")
    want = _reference(base, x, [a.to(x.dtype) for a in As], [b.to(x.dtype) for b in Bs], scales,
                      reference[:, :, 1].to(x.dtype), 0.7)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if path == "training":
        got.square().sum().backward()
        want.square().sum().backward()
        torch.testing.assert_close(scalings.grad, reference.grad, rtol=1e-4, atol=1e-4)


def test_experts_off_skips_the_expert_matmuls():
    d_in, d_out, ranks = 8, 8, [2, 2]
    base = nn.Linear(d_in, d_out)
    As, Bs, scales = _experts(d_in, d_out, ranks)
    stacked = _stack(As, Bs, ranks, scales)
    stacked.lora_A.fill_(float("nan"))  # any expert matmul would turn the output into NaN (NaN * 0 is NaN)
    state = MixState()
    layer = MixedLoRALinear(base, stacked, 0, state)
    x = torch.randn(3, d_in)
    assert torch.equal(layer(x), base(x))  # scalings None: exactly the base layer
    with state.use(torch.zeros(1, 3, 1, 2)):
        assert torch.isnan(layer(x.unsqueeze(0))).all()


def test_dtype_and_device_follow_the_base_layer():
    torch.manual_seed(0)
    base = nn.Linear(8, 6).to(torch.bfloat16)
    As, Bs, scales = _experts(8, 6, [2, 3])
    state = MixState()
    layer = MixedLoRALinear(base, _stack(As, Bs, [2, 3], scales, dtype=torch.bfloat16), 0, state)
    x = torch.randn(1, 4, 8, dtype=torch.bfloat16)
    s = torch.rand(1, 4, 1, 2, dtype=torch.bfloat16)
    with state.use(s):
        y = layer(x)
    assert y.dtype == torch.bfloat16 and layer.lora_A.dtype == torch.bfloat16
    assert layer.rank_scale.dtype == torch.bfloat16
    assert y.device == base.weight.device == layer.lora_A.device == layer.rank_scale.device
    # the values: the float32 reference of the same bf16 weights, within bf16 rounding
    want = base.float()(x.float())
    for e in range(2):
        a, b = As[e].to(torch.bfloat16).float(), Bs[e].to(torch.bfloat16).float()
        want = want + s[..., 0, e, None].float() * scales[e] * (x.float() @ a.T @ b.T)
    scale = float(want.abs().max())  # bf16 keeps ~3 significant digits through the matmuls
    torch.testing.assert_close(y.float(), want, rtol=0, atol=2e-2 * scale)


def test_tokens_flattened_by_the_model_still_get_their_own_scalings():
    base = nn.Linear(6, 4)
    As, Bs, scales = _experts(6, 4, [2, 2])
    state = MixState()
    layer = MixedLoRALinear(base, _stack(As, Bs, [2, 2], scales), 0, state)
    x = torch.randn(2, 3, 6)
    s = torch.rand(2, 3, 1, 2)
    with state.use(s):
        full = layer(x)
        flat = layer(x.reshape(6, 6))
    torch.testing.assert_close(flat.reshape(2, 3, 4), full)


def test_rejects_other_module_types():
    with pytest.raises(TypeError, match="Embedding"):
        MixedLoRALinear(
            nn.Embedding(4, 4), StackedLoRA(torch.zeros(1, 4), torch.zeros(4, 1), [1], [1.0]), 0, MixState()
        )

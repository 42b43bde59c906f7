"""The dual-pass model against PEFT, the reference implementation, where PEFT is correct."""

import pytest
import torch

import loramix
from loramix import GateConfig, MixConfig
from loramix.gate import apply_top_k

from conftest import load_base


def _peft_xlora(llama_dir, adapter_dirs, **xlora_kwargs):
    from peft import XLoraConfig, get_peft_model

    base = load_base(llama_dir)
    torch.manual_seed(0)
    config = XLoraConfig(
        task_type="CAUSAL_LM",
        hidden_size=base.config.hidden_size,
        adapters={str(i): str(d) for i, d in enumerate(adapter_dirs)},  # PEFT needs names "0".."n-1"
        **xlora_kwargs,
    )
    model = get_peft_model(base, config).eval()
    with torch.no_grad():  # PEFT initialises the classifier's last layer small: make scalings far from uniform
        for p in model.base_model.internal_xlora_classifier.parameters():
            p.normal_(0.0, 0.5)
    return model


PEFT_CASES = [
    dict(xlora_depth=1),
    dict(xlora_depth=1, layerwise_scalings=True),
    dict(xlora_depth=2, xlora_size=16, layerwise_scalings=True),
    dict(xlora_depth=2, xlora_size=24, enable_softmax=False),
    dict(xlora_depth=3, xlora_size=16, layerwise_scalings=True, softmax_temperature=0.5),
    dict(top_k_lora=2, layerwise_scalings=True),
    dict(top_k_lora=1),
    dict(top_k_lora=2, enable_softmax_topk=True, enable_softmax=False, layerwise_scalings=True),
    dict(global_scaling_weight=0.6, layerwise_scalings=True),
    dict(scaling_pass_value=0.3, layerwise_scalings=True),
]


@pytest.mark.parametrize("kwargs", PEFT_CASES, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_logits_equal_peft_xlora(llama_dir, llama_experts_same_targets, input_ids, kwargs):
    peft_model = _peft_xlora(llama_dir, llama_experts_same_targets, **kwargs)
    mix = loramix.from_peft(peft_model)
    mask = torch.ones_like(input_ids)
    mask[0, :2] = 0  # left padding in the first row
    with torch.no_grad():
        want = peft_model(input_ids=input_ids, attention_mask=mask).logits
        peft_scalings = peft_model.base_model.get_latest_scalings()
        got = mix(input_ids, attention_mask=mask)
    torch.testing.assert_close(got.logits, want, rtol=1e-4, atol=1e-4)
    if kwargs.get("top_k_lora"):  # PEFT applies top-k inside each layer; loramix reports what the layers use
        peft_scalings = apply_top_k(peft_scalings, kwargs["top_k_lora"], kwargs.get("enable_softmax_topk", False))
    torch.testing.assert_close(got.scalings, peft_scalings, rtol=1e-5, atol=1e-6)
    assert got.scalings.shape == (2, 7, 10, 3)
    # the experts matter: the mixture is far from the base model
    assert (got.logits - mix.base_forward(input_ids, attention_mask=mask).logits).abs().max() > 1e-2


def test_from_peft_maps_every_option(llama_dir, llama_experts_same_targets):
    peft_model = _peft_xlora(
        llama_dir,
        llama_experts_same_targets,
        xlora_depth=2,
        xlora_size=16,
        xlora_dropout_p=0.1,
        layerwise_scalings=True,
        top_k_lora=2,
        softmax_temperature=0.7,
        global_scaling_weight=0.9,
        scaling_pass_value=0.1,
        use_trainable_adapters=True,
    )
    mix = loramix.from_peft(peft_model)
    assert mix.config == MixConfig(
        gate=GateConfig(
            depth=2, width=16, dropout=0.1, softmax=True, temperature=0.7, top_k=2, layerwise=True, hidden_size=32
        ),
        scaling_pass_value=0.1,
        global_scaling_weight=0.9,
        trainable_experts=True,
    )
    assert mix.expert_names == ["0", "1", "2"]
    assert [p.requires_grad for p in (mix.gate.last.weight, mix.model.model.layers[0].self_attn.q_proj.lora_A)] == [
        True,
        True,
    ]


def _single_expert_scalings(mix, expert: int, batch: int, tokens: int) -> torch.Tensor:
    s = torch.zeros(batch, tokens, mix.n_layers, mix.n_experts)
    s[..., expert] = 1.0
    return s


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_one_expert_at_scaling_one_equals_the_peft_lora_model(request, arch, input_ids):
    from peft import PeftModel

    base_dir = request.getfixturevalue(f"{arch}_dir")
    experts = request.getfixturevalue(f"{arch}_experts")
    mix = loramix.from_pretrained(base_dir, experts)
    for index, (name, path) in enumerate(experts.items()):
        reference = PeftModel.from_pretrained(load_base(base_dir), str(path)).eval()
        with torch.no_grad():
            want = reference(input_ids=input_ids).logits
            got = mix(input_ids, scalings=_single_expert_scalings(mix, index, *input_ids.shape)).logits
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=f"expert {name}")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_constant_mixture_equals_peft_weighted_adapter(request, arch, input_ids):
    """Any fixed mixture is one LoRA of rank sum(r): PEFT's exact 'cat' combination is the reference."""
    from peft import PeftModel

    base_dir = request.getfixturevalue(f"{arch}_dir")
    experts = request.getfixturevalue(f"{arch}_experts")
    names = list(experts)
    weights = [0.7, -0.4, 1.3][: len(names)]
    reference = PeftModel.from_pretrained(load_base(base_dir), str(experts[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        reference.load_adapter(str(experts[name]), adapter_name=name)
    reference.add_weighted_adapter(names, weights, adapter_name="mix", combination_type="cat")
    reference.set_adapter("mix")
    mix = loramix.from_pretrained(base_dir, experts)
    s = torch.tensor(weights).expand(*input_ids.shape, mix.n_layers, len(names))
    with torch.no_grad():
        torch.testing.assert_close(
            mix(input_ids, scalings=s).logits, reference(input_ids=input_ids).logits, rtol=1e-4, atol=1e-4
        )


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_scaling_pass_is_the_base_model_and_skips_lm_head_and_experts(request, arch, input_ids):
    base_dir = request.getfixturevalue(f"{arch}_dir")
    mix = loramix.from_pretrained(
        base_dir, request.getfixturevalue(f"{arch}_experts"), MixConfig(gate=GateConfig(layerwise=True))
    )
    base = load_base(base_dir)
    with torch.no_grad():
        want = base(input_ids=input_ids, output_hidden_states=True).hidden_states[-1]
    calls = {"lm_head": 0}
    handle = mix.model.get_output_embeddings().register_forward_hook(
        lambda *_: calls.__setitem__("lm_head", calls["lm_head"] + 1)
    )
    for layer in mix.mixed_layers():  # any expert matmul in the scaling pass would now give NaN
        layer.lora_A.data.fill_(float("nan"))
    try:
        hidden = mix.scaling_pass(input_ids)
    finally:
        handle.remove()
    torch.testing.assert_close(hidden, want, rtol=1e-5, atol=1e-5)
    assert calls["lm_head"] == 0
    assert not hidden.requires_grad


def test_gradients_reach_only_the_gate(llama_dir, llama_experts, input_ids):
    mix = loramix.from_pretrained(llama_dir, llama_experts, MixConfig(gate=GateConfig(depth=2, layerwise=True)))
    mix.train()
    out = mix(input_ids, labels=input_ids)
    out.loss.backward()
    gate_grads = [p.grad for p in mix.gate.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in gate_grads)
    others = [(n, p) for n, p in mix.named_parameters() if not n.startswith("gate.")]
    assert others and all(p.grad is None and not p.requires_grad for _, p in others)
    assert {n for n, p in mix.named_parameters() if p.requires_grad} == {
        n for n, _ in mix.gate.named_parameters(prefix="gate")
    }


def test_trainable_experts_get_gradients_base_stays_frozen(llama_dir, llama_experts, input_ids):
    mix = loramix.from_pretrained(llama_dir, llama_experts, MixConfig(trainable_experts=True))
    mix(input_ids, labels=input_ids).loss.backward()
    layer = next(iter(mix.mixed_layers()))
    assert layer.lora_A.grad is not None and layer.lora_A.grad.abs().sum() > 0
    assert layer.base_layer.weight.grad is None
    assert mix.model.get_input_embeddings().weight.grad is None


def test_gpt2_backbone_is_found_and_mixing_works(gpt2_dir, gpt2_experts, input_ids):
    mix = loramix.from_pretrained(gpt2_dir, gpt2_experts, MixConfig(gate=GateConfig(depth=2, layerwise=True)))
    assert mix.backbone is mix.model.transformer
    assert mix.layer_names[:3] == [
        "transformer.h.0.attn.c_attn",
        "transformer.h.0.attn.c_proj",
        "transformer.h.0.mlp.c_fc",
    ]
    out = mix(input_ids)
    assert out.logits.shape == (2, 7, 96) and out.scalings.shape == (2, 7, mix.n_layers, 2)
    torch.testing.assert_close(out.scalings.sum(-1), torch.ones(2, 7, mix.n_layers))


def test_loaded_model_is_used_in_place_and_can_be_unloaded(llama_dir, llama_experts, input_ids):
    base = load_base(llama_dir)
    with torch.no_grad():
        want = base(input_ids=input_ids).logits
    mix = loramix.from_pretrained(base, llama_experts)
    assert mix.model is base
    plain = mix.unload()
    assert type(plain.model.layers[0].self_attn.q_proj).__name__ == "Linear"
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=input_ids).logits, want)


def test_non_layerwise_gate_gives_the_same_row_to_every_layer(llama_dir, llama_experts, input_ids):
    mix = loramix.from_pretrained(llama_dir, llama_experts, MixConfig(gate=GateConfig(layerwise=False)))
    s = mix(input_ids).scalings
    assert torch.equal(s, s[:, :, :1].expand_as(s))
    assert mix.gate.last.out_features == 3


def test_bad_scalings_shape_is_refused(llama_dir, llama_experts, input_ids):
    mix = loramix.from_pretrained(llama_dir, llama_experts)
    with pytest.raises(loramix.ConfigError, match=r"expected \[batch, tokens, 12, 3\]"):
        mix(input_ids, scalings=torch.zeros(2, 7, 3))

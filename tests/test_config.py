import json

import pytest

import loramix
from loramix import ConfigError, GateConfig, MixConfig


def test_defaults_match_peft_xlora_config():
    from peft import XLoraConfig

    peft = XLoraConfig(hidden_size=8, adapters={"a": "x"})
    ours = MixConfig()
    assert ours.gate.depth == peft.xlora_depth
    assert ours.gate.dropout == peft.xlora_dropout_p
    assert ours.gate.softmax == peft.enable_softmax
    assert ours.gate.temperature == peft.softmax_temperature
    assert ours.gate.top_k == peft.top_k_lora
    assert ours.gate.topk_softmax == peft.enable_softmax_topk
    assert ours.gate.layerwise == peft.layerwise_scalings
    assert ours.scaling_pass_value == peft.scaling_pass_value
    assert ours.global_scaling_weight == peft.global_scaling_weight
    assert ours.trainable_experts == peft.use_trainable_adapters
    # sizes are never defaulted: PEFT's 4096 hidden size default is the pitfall
    assert ours.gate.hidden_size is None and ours.gate.width is None


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"depth": 0}, "gate.depth"),
        ({"depth": 1.5}, "gate.depth"),
        ({"width": 0}, "gate.width"),
        ({"dropout": 1.0}, "gate.dropout"),
        ({"dropout": -0.1}, "gate.dropout"),
        ({"temperature": 0}, "gate.temperature"),
        ({"temperature": float("nan")}, "gate.temperature"),
        ({"temperature": 1e-300}, "gate.temperature=1e-300 must be a number >= 0.001"),
        ({"temperature": 9e-4}, "gate.temperature"),
        ({"top_k": 0}, "gate.top_k"),
        ({"top_k": 1.5}, "gate.top_k"),
        ({"topk_softmax": True}, "gate.topk_softmax"),
        ({"softmax": "yes"}, "gate.softmax"),
        ({"hidden_size": -3}, "gate.hidden_size"),
    ],
)
def test_gate_config_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        GateConfig(**kwargs)


def test_gate_config_bounds_are_inclusive():
    for kwargs in ({"depth": 1}, {"depth": 64}, {"width": 1}, {"width": 131072}, {"top_k": 1}, {"dropout": 0.0}):
        GateConfig(**kwargs)  # the edges are valid
    GateConfig(temperature=1e-3)  # MIN_TEMPERATURE
    for kwargs in ({"depth": 65}, {"width": 131073}):
        with pytest.raises(ConfigError):
            GateConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"scaling_pass_value": float("inf")}, "scaling_pass_value"),
        ({"global_scaling_weight": "1"}, "global_scaling_weight"),
        ({"trainable_experts": 1}, "trainable_experts"),
        ({"scaling_layer": 0}, "scaling_layer"),
    ],
)
def test_mix_config_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        MixConfig(**kwargs)


def test_json_round_trip():
    config = MixConfig(
        gate=GateConfig(depth=3, width=16, dropout=0.1, softmax=False, top_k=2, topk_softmax=True, layerwise=True),
        scaling_pass_value=None,
        global_scaling_weight=0.5,
        trainable_experts=True,
        scaling_layer=1,
    )
    again = MixConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    assert isinstance(again.gate, GateConfig)


def test_unknown_keys_are_refused_with_the_expected_ones_listed():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['colour'\]"):
        MixConfig.from_dict({"colour": "red"})
    with pytest.raises(ConfigError, match=r"gate: unknown key\(s\) \['xlora_depth'\].*depth"):
        MixConfig.from_dict({"gate": {"xlora_depth": 2}})


def test_scaling_pass_value_none_means_one_over_n():
    assert MixConfig(scaling_pass_value=None).resolved_scaling_pass_value(4) == 0.25


def test_sizes_are_inferred_from_the_model_and_checked(llama_dir, llama_experts):
    model = loramix.from_pretrained(llama_dir, llama_experts)
    assert model.hidden_size == 32  # from the model, not PEFT's silent 4096
    assert model.gate.last.in_features == 32
    with pytest.raises(ConfigError, match=r"gate\.hidden_size=4096 does not match the base model's hidden size 32"):
        loramix.from_pretrained(llama_dir, llama_experts, MixConfig(gate=GateConfig(hidden_size=4096)))
    with pytest.raises(ConfigError, match=r"gate\.top_k=5 is larger than the number of experts \(3\)"):
        loramix.from_pretrained(llama_dir, llama_experts, MixConfig(gate=GateConfig(top_k=5)))
    with pytest.raises(ConfigError, match=r"scaling_layer=3 is out of range: the base model has 2 decoder blocks"):
        loramix.from_pretrained(llama_dir, llama_experts, MixConfig(scaling_layer=3))

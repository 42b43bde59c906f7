"""PEFT interop (live XLoraModel export) and the exact static export to one PEFT LoRA."""

import json

import pytest
import torch
from safetensors.torch import save_file

import loramix
from loramix import ConfigError, GateConfig, MixConfig
from loramix.interop.peft import to_peft
from loramix.interop.static import export_static, fixed_scalings_from_prompt, read_scalings_file

from conftest import load_base


def _mix(base_dir, experts, **gate):
    mix = loramix.from_pretrained(base_dir, experts, MixConfig(gate=GateConfig(**gate)))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in mix.gate.parameters():
            p.normal_(0, 0.5)
    return mix


@pytest.mark.parametrize(
    "gate",
    [dict(depth=1), dict(depth=2, width=16, layerwise=True), dict(depth=1, layerwise=True, top_k=2)],
    ids=["d1", "d2-layerwise", "top2"],
)
def test_to_peft_gives_a_live_xlora_model_with_equal_logits(llama_dir, llama_experts, input_ids, gate):
    mix = _mix(llama_dir, llama_experts, **gate)  # different ranks, targets and an rsLoRA expert
    peft_model = to_peft(mix)
    with torch.no_grad():
        want = mix(input_ids).logits
        got = peft_model(input_ids=input_ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    back = loramix.from_peft(peft_model)  # and back again
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids).logits, want, rtol=1e-4, atol=1e-4)


def test_to_peft_refuses_what_peft_cannot_load(gpt2_dir, gpt2_experts, llama_dir, llama_experts):
    mix = _mix(gpt2_dir, gpt2_experts)
    with pytest.raises(ConfigError, match=r"backbone is '\.model' \(GPT2LMHeadModel has '\.transformer'\)"):
        to_peft(mix)
    truncated = loramix.from_pretrained(llama_dir, llama_experts, MixConfig(scaling_layer=1))
    with pytest.raises(ConfigError, match=r"scaling_layer=1: PEFT's XLoraModel always runs the full scaling pass"):
        to_peft(truncated)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_static_export_is_exact(request, arch, tmp_path, input_ids):
    from peft import PeftModel

    base_dir = request.getfixturevalue(f"{arch}_dir")
    mix = _mix(base_dir, request.getfixturevalue(f"{arch}_experts"), layerwise=True)
    g = torch.Generator().manual_seed(3)
    s = torch.rand(mix.n_layers, mix.n_experts, generator=g)
    s[:, 0] = 0.0  # an expert switched off entirely
    report = export_static(mix, s, tmp_path / "static")
    assert report["max_relative_error"] == 0.0
    peft_model = PeftModel.from_pretrained(load_base(base_dir), str(tmp_path / "static")).eval()
    with torch.no_grad():
        want = mix(input_ids, scalings=s.float().expand(*input_ids.shape, -1, -1)).logits
        got = peft_model(input_ids=input_ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    config = json.loads((tmp_path / "static" / "adapter_config.json").read_text())
    assert config["r"] == max(sum(layer.ranks[1:]) for layer in mix.mixed_layers())


def test_static_export_svd_reports_its_error(llama_dir, llama_experts, tmp_path, input_ids):
    from peft import PeftModel

    mix = _mix(llama_dir, llama_experts, layerwise=True)
    s = torch.full((mix.n_layers, mix.n_experts), 0.5)
    exact = mix(input_ids, scalings=s.expand(*input_ids.shape, -1, -1)).logits.detach()
    errors = {}
    for rank in (1, 3, 9):
        report = export_static(mix, s, tmp_path / f"r{rank}", rank=rank)
        peft_model = PeftModel.from_pretrained(load_base(llama_dir), str(tmp_path / f"r{rank}")).eval()
        with torch.no_grad():
            errors[rank] = (
                report["max_relative_error"],
                float((peft_model(input_ids=input_ids).logits - exact).abs().max()),
            )
    assert errors[1][0] > errors[3][0] > 0 and errors[9][0] == pytest.approx(0.0, abs=1e-6)
    assert errors[1][1] > errors[3][1] and errors[9][1] < 1e-4  # the logits follow the reported error


def test_static_scalings_from_a_prompt_and_from_files(llama_dir, llama_experts, tmp_path, tokenizer):
    mix = _mix(llama_dir, llama_experts, layerwise=True)
    mix.tokenizer = tokenizer
    s = fixed_scalings_from_prompt(mix, "CalculateGRAVY<ACDK>")
    ids = tokenizer("CalculateGRAVY<ACDK>", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(s, mix.compute_scalings(ids)[0].mean(0).double())
    good = tmp_path / "s.json"
    good.write_text(json.dumps([0.2, 0.3, 0.5]))  # one row for every layer
    want = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64).expand(mix.n_layers, 3)
    torch.testing.assert_close(read_scalings_file(good, mix.n_layers, 3), want, rtol=0, atol=0)
    per_layer = torch.rand(mix.n_layers, 3, dtype=torch.float64)
    (tmp_path / "layers.json").write_text(json.dumps(per_layer.tolist()))
    torch.testing.assert_close(read_scalings_file(tmp_path / "layers.json", mix.n_layers, 3), per_layer)
    save_file({"scalings": per_layer.float()}, str(tmp_path / "s.safetensors"))
    torch.testing.assert_close(
        read_scalings_file(tmp_path / "s.safetensors", mix.n_layers, 3), per_layer.float().double(), rtol=0, atol=0
    )
    save_file({"other": per_layer.float()}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ConfigError, match=r"expected a tensor named 'scalings', found \['other'\]"):
        read_scalings_file(tmp_path / "other.safetensors", mix.n_layers, 3)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([[1, 2]]))
    with pytest.raises(ConfigError, match=r"bad\.json: scalings of shape \(1, 2\); expected \[12, 3\]"):
        read_scalings_file(bad, mix.n_layers, 3)
    nan = tmp_path / "nan.json"
    nan.write_text("[0.1, NaN, 0.3]")
    with pytest.raises(ConfigError, match=r"nan\.json: the scalings contain NaN or infinite values"):
        read_scalings_file(nan, mix.n_layers, 3)
    with pytest.raises(ConfigError, match=r"none\.json is missing \(scalings: "):
        read_scalings_file(tmp_path / "none.json", mix.n_layers, 3)

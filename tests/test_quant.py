"""Quantized bases (docs/quantization.md): torchao int8 / int4 and bitsandbytes NF4 / 8-bit, all on CPU.

The tight check: a mixture over a quantized base equals, to float32 rounding, the same mixture over a float base whose
linears hold the *dequantized* weights (so the quantized layers are wrapped, not dequantized, and the experts add
exactly their terms). The loose check: against the float mixture, within the int8 rounding bound derived below.
The base is a tiny Llama of hidden size 64: bitsandbytes' CPU 4-bit kernels need in_features >= their block of 64.
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

import loramix
from loramix.errors import BaseModelMismatchError, CheckpointError, ConfigError
from loramix.quant import dense_weight, describe_quantization, quantization_config
from loramix.train import TrainConfig, train_gate

from conftest import char_tokenizer, make_adapter, run_cli, save_model, tiny_llama

PROMPT = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46], [1, 50, 52, 54, 56, 58, 60, 62]])


@pytest.fixture(scope="module")
def qworld(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    base = save_model(tiny_llama(seed=4, hidden_size=64, intermediate_size=128), root / "base")
    char_tokenizer().save_pretrained(str(base))
    experts = {
        "left": make_adapter(base, root / "left", r=4, alpha=8, seed=1),
        "right": make_adapter(base, root / "right", targets=["q_proj", "v_proj", "up_proj"], r=3, alpha=6, seed=3),
    }
    other = save_model(tiny_llama(seed=9, hidden_size=64, intermediate_size=128), root / "other")
    return {"root": root, "base": base, "experts": experts, "other": other}


def _mix(qworld, quantize=None, config=None):
    torch.manual_seed(0)  # the same gate initialisation for every mixture
    return loramix.from_pretrained(qworld["base"], qworld["experts"], config, quantize=quantize)


def _dequantized_twin(qworld, quantized, config=None):
    """The float mixture with every base linear set to what the quantized one computes with (dequantized)."""
    twin = _mix(qworld, None, config)
    twin.gate.load_state_dict(quantized.gate.state_dict())
    q_modules = dict(quantized.model.named_modules())
    replaced = 0
    with torch.no_grad():
        for name, module in twin.model.named_modules():
            dense = dense_weight(q_modules[name]) if type(module) in (nn.Linear, nn.Embedding) else None
            if dense is not None and dense is not q_modules[name].weight:  # a quantized weight, dequantized
                module.weight.copy_(dense.float())
                replaced += 1
    assert replaced > 0
    return twin


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize(
    ("quantize", "kind", "tight"),
    [
        ("int8", "Int8Tensor", 1e-5),
        ("int4", "IntxUnpackedToInt8Tensor", 1e-5),
        ("nf4", "Params4bit", 1e-2),  # CPU with AVX512-BF16: bitsandbytes multiplies in bfloat16 (2^-9 rounding)
    ],
)
def test_mixture_over_a_quantized_base_wraps_the_quantized_linears_and_adds_exact_expert_terms(
    qworld, quantize, kind, tight
):
    floating = _mix(qworld)
    mix = _mix(qworld, quantize)
    # every adapted module of the float mixture is mixed here too: no silent no-op (xlora #22)
    assert mix.layer_names == floating.layer_names and mix.n_layers == 12
    for layer in mix.mixed_layers():
        assert type(layer.base_layer.weight).__name__ == kind  # wrapped, still quantized
        assert layer.lora_A.dtype == torch.float32 and layer.lora_B.dtype == torch.float32  # experts never quantized
    assert mix.gate.last.weight.dtype == torch.float32
    twin = _dequantized_twin(qworld, mix)
    with torch.no_grad():
        got, want = mix(PROMPT).logits, twin(PROMPT).logits
        base_only = mix.base_forward(PROMPT).logits
    assert _rel(got, want) < tight
    assert _rel(base_only, want) > 10 * tight  # the experts change the output far beyond the tolerance


def test_int8_logits_within_the_int8_rounding_bound_of_the_float_mixture(qworld):
    """Int8 weight-only rounds each weight to the nearest step of its row, scale = max|w_row| / 127, so each weight
    moves by at most 1/254 = 0.39% of its row's largest value. Through the 2 x 7 quantized linears in series of this
    model (embeddings and LM head stay float), first-order errors add up to at most 14 x 0.39% = 5.5% of the logits'
    scale; random rounding errors partly cancel, so 5.5% is a bound, not an expectation (measured: 2.6%)."""
    floating, mix = _mix(qworld), _mix(qworld, "int8")
    assert type(mix.model.get_input_embeddings().weight) is nn.Parameter  # float: see docs/quantization.md
    assert type(mix.model.lm_head.weight) is nn.Parameter
    with torch.no_grad():
        want, got = floating(PROMPT).logits, mix(PROMPT).logits
        plain = floating.base_forward(PROMPT).logits
    bound = 14 / 254
    assert 0 < _rel(got, want) < bound
    assert _rel(plain, want) > 2 * bound  # a mixture that dropped its experts would fail


def test_bitsandbytes_int8_runs_on_cpu_within_the_llm_int8_bound(qworld):
    """bitsandbytes' LLM.int8 rounds the activations to int8 per row as well as the weights of the 2 x 7 linears
    (embeddings and LM head stay float; float16 on CPU): twice 14 x 1/254."""
    from transformers import BitsAndBytesConfig

    floating = _mix(qworld)
    torch.manual_seed(0)
    mix = loramix.from_pretrained(
        qworld["base"], qworld["experts"], quantization_config=BitsAndBytesConfig(load_in_8bit=True)
    )
    assert all(type(layer.base_layer).__name__ == "Linear8bitLt" for layer in mix.mixed_layers())
    assert describe_quantization(mix.model)["name"] == "bnb-int8"
    with torch.no_grad():
        want, got = floating(PROMPT).logits, mix(PROMPT).logits
        plain = floating.base_forward(PROMPT).logits
    assert 0 < _rel(got, want) < 2 * 14 / 254 < _rel(plain, want)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's memory maps (Linux /proc)")
def test_a_quantized_base_does_not_keep_the_float_checkpoint_mapped(qworld, tmp_path):
    """transformers keeps a safetensors file mapped while any tensor views it; after quantizing, the float norms did,
    and every page of the float weights it had read stayed resident (see docs/quantization.md)."""
    base = Path(shutil.copytree(qworld["base"], tmp_path / "base"))
    mix = _mix({**qworld, "base": base}, "int8")
    gc.collect()
    assert mix.n_layers == 12 and str(base / "model.safetensors") not in Path("/proc/self/maps").read_text()


def test_save_load_round_trip_restores_the_recorded_quantization(qworld, tmp_path, caplog):
    mix = _mix(qworld, "int8")
    mix.save(tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / "loramix_config.json").read_text())
    assert meta["base"]["quantization"]["name"] == "int8"
    assert meta["base"]["quantization"]["config"]["quant_method"] == "torchao"

    again = loramix.load(tmp_path / "ckpt")
    assert type(again.model.get_submodule("model.layers.0.self_attn.q_proj").base_layer.weight).__name__ == "Int8Tensor"
    with torch.no_grad():
        assert torch.equal(again(PROMPT).logits, mix(PROMPT).logits)

    with caplog.at_level(logging.WARNING, logger="loramix.loading"):
        floating = loramix.load(tmp_path / "ckpt", quantize="none")
    assert "made over a int8 base, this base is float" in caplog.text
    assert describe_quantization(floating.model) is None
    assert torch.equal(floating.gate.last.weight, mix.gate.last.weight)

    with pytest.raises(BaseModelMismatchError, match="base weights differ"):
        loramix.load(tmp_path / "ckpt", base=qworld["other"])
    with pytest.raises(CheckpointError, match="include_base=True over a int8 base"):
        mix.save(tmp_path / "bundled", include_base=True)
    assert not (tmp_path / "bundled").exists()


def test_nf4_round_trip_after_a_cpu_forward(qworld, tmp_path):
    """bitsandbytes repacks 4-bit weights at the first CPU forward; the fingerprint still reads the right values."""
    mix = _mix(qworld, "nf4")
    with torch.no_grad():
        logits = mix(PROMPT).logits
    mix.save(tmp_path / "ckpt")
    again = loramix.load(tmp_path / "ckpt")
    assert describe_quantization(again.model)["name"] == "bnb-nf4"
    with torch.no_grad():
        assert _rel(again(PROMPT).logits, logits) < 1e-6


@pytest.mark.parametrize("quantize", ["int8", "nf4"])
def test_a_float_checkpoint_loads_over_a_quantized_base_with_a_warning(qworld, tmp_path, caplog, quantize):
    _mix(qworld).save(tmp_path / "float")
    with caplog.at_level(logging.WARNING, logger="loramix.loading"):
        mix = loramix.load(tmp_path / "float", quantize=quantize)
    assert f"made over a float base, this base is {describe_quantization(mix.model)['name']}" in caplog.text
    with pytest.raises(BaseModelMismatchError):  # the 4-bit tolerance still tells another base apart
        loramix.load(tmp_path / "float", base=qworld["other"], quantize=quantize)


def test_generation_over_an_int8_base_in_every_mode(qworld):
    mix = _mix(qworld, "int8", loramix.MixConfig(scaling_layer=1))
    twin = _dequantized_twin(qworld, mix, loramix.MixConfig(scaling_layer=1))
    kwargs = dict(max_new_tokens=6, eos_token_id=[], output_logits=True)
    for mode in ("granular", "prompt", "truncated"):
        cached = mix.generate(PROMPT, mode=mode, **kwargs)
        reference = twin.generate(PROMPT, mode=mode, **kwargs)
        assert torch.equal(cached.sequences, reference.sequences), mode
        assert _rel(cached.logits, reference.logits) < 1e-5, mode
    full = mix.generate(PROMPT, use_cache=False, **kwargs)
    granular = mix.generate(PROMPT, **kwargs)
    assert torch.equal(full.sequences, granular.sequences)
    compiled = mix.generate(PROMPT, compile="aot_eager", **kwargs)
    assert torch.equal(compiled.sequences, granular.sequences)
    assert _rel(compiled.logits, granular.logits) < 1e-5
    text = "".join(mix.stream("abc", max_new_tokens=4, eos_token_id=[]))
    assert len(text) > 0


@pytest.mark.parametrize("trainable_experts", [False, True])
def test_gate_training_over_an_int8_base(qworld, tmp_path, trainable_experts):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": "abcdefghij"[i % 5 :] * 2}) + "\n" for i in range(16)))
    config = loramix.MixConfig(trainable_experts=trainable_experts)
    mix = _mix(qworld, "int8", config)
    q_before = {n: m.weight.qdata.clone() for n, m in mix.model.named_modules() if hasattr(m, "weight") and
                type(m.weight).__name__ == "Int8Tensor"}
    before = {n: p.detach().clone() for n, p in mix.named_parameters() if type(p.data) is torch.Tensor}
    train = TrainConfig(learning_rate=1e-2, max_steps=3, batch_size=4, seed=0, progress=False)
    metrics = train_gate(mix, data, tmp_path / "ckpt", train=train)
    assert torch.isfinite(torch.tensor(metrics["loss"]))
    changed = {n for n, p in mix.named_parameters() if n in before and not torch.equal(p, before[n])}
    gate = {n for n, _ in mix.gate.named_parameters(prefix="gate")}
    experts = {n for n in before if n.endswith(("lora_A", "lora_B"))}
    assert changed == (gate | experts if trainable_experts else gate)
    assert q_before and all(torch.equal(mix.model.get_submodule(n).weight.qdata, q) for n, q in q_before.items())
    again = loramix.load(tmp_path / "ckpt")
    assert describe_quantization(again.model)["name"] == "int8"
    assert torch.equal(again.gate.last.weight, mix.gate.last.weight)


def test_train_gate_builds_a_quantized_mixture_from_base_and_experts(qworld, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": "0123456789"[i % 4 :]}) + "\n" for i in range(8)))
    train = TrainConfig(learning_rate=1e-2, max_steps=2, batch_size=4, seed=0, progress=False)
    train_gate(None, data, tmp_path / "ckpt", base=qworld["base"], experts=qworld["experts"], quantize="nf4",
               train=train)
    meta = json.loads((tmp_path / "ckpt" / "loramix_config.json").read_text())
    assert meta["base"]["quantization"]["name"] == "bnb-nf4"


def test_a_mixture_that_adapts_no_layer_is_an_error(qworld):
    from loramix.base import load_base_model
    from loramix.experts import ExpertInfo
    from loramix.model import LoraMixModel

    model, _ = load_base_model(qworld["base"], quantize="int8")
    with pytest.raises(ConfigError, match=r"adapt no module of the base model LlamaForCausalLM"):
        LoraMixModel(model, {}, [ExpertInfo("left")])


def test_quantize_names_and_missing_choices_are_refused(qworld):
    with pytest.raises(ConfigError, match="quantize='fp3': expected one of int8, int4, nf4 or none"):
        quantization_config("fp3")
    assert quantization_config("none") is None
    with pytest.raises(ConfigError, match="quantize / quantization_config apply when the base is loaded"):
        loramix.from_pretrained(tiny_llama(), qworld["experts"], quantize="int8")


def test_export_mistralrs_over_a_quantized_base(qworld, tmp_path):
    from loramix.interop.mistralrs import ExportError, export_mistralrs

    same_targets = {n: make_adapter(qworld["base"], tmp_path / n, seed=i) for i, n in enumerate(("left", "right"))}
    mix = loramix.from_pretrained(qworld["base"], same_targets, quantize="int8")  # mistral.rs: equal targets
    with pytest.raises(ExportError, match="with_base over a int8 base"):
        export_mistralrs(mix, tmp_path / "xl", base_model_id=str(qworld["base"]), with_base=tmp_path / "b")
    assert not (tmp_path / "xl").exists() and not (tmp_path / "b").exists()
    mix.save(tmp_path / "ckpt")
    result = run_cli("export", tmp_path / "ckpt", "--format", "mistralrs", "--out", tmp_path / "xl")
    assert result.returncode == 0, result.stderr
    assert "made over a int8 base; the export names the unquantized base" in result.stderr
    assert (tmp_path / "xl" / "xlora_config.json").is_file()
    info = run_cli("info", tmp_path / "ckpt")
    assert info.returncode == 0 and ", quantized int8" in info.stdout, info.stderr


def test_cli_quantize_option(qworld, tmp_path):
    _mix(qworld).save(tmp_path / "ckpt")
    ok = run_cli("generate", tmp_path / "ckpt", "-p", "abc", "-n", "3", "--quantize", "int8", "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout.splitlines()[0])["prompt"] == "abc"
    bad = run_cli("generate", tmp_path / "ckpt", "-p", "abc", "--quantize", "fp3")
    lines = [x for x in bad.stderr.splitlines() if x.strip()]
    assert bad.returncode == 2 and len(lines) == 1 and "unknown quantization 'fp3'" in lines[0], bad.stderr


def test_cli_train_gate_over_a_quantized_base(qworld, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": "abcdefgh"[i % 4 :]}) + "\n" for i in range(8)))
    experts = [f"--expert={name}={path}" for name, path in qworld["experts"].items()]
    args = ("--data", data, "--out", tmp_path / "ckpt", "--max-steps", "1", "--batch-size", "4", "--quantize", "int8")
    result = run_cli("train-gate", "--base", qworld["base"], *experts, *args)
    assert result.returncode == 0, result.stderr
    meta = json.loads((tmp_path / "ckpt" / "loramix_config.json").read_text())
    assert meta["base"]["quantization"]["name"] == "int8"


def test_a_missing_backend_and_a_broken_one_are_told_apart(tmp_path, monkeypatch):
    from loramix.quant import _need

    missing = r"needs the 'loramix_no_such_backend' package, which is not installed: pip install 'loramix\[quant\]'"
    with pytest.raises(ConfigError, match=missing):
        _need("loramix_no_such_backend.quantization", "quantize=int8")
    broken = tmp_path / "loramix_broken_backend"
    broken.mkdir()
    (broken / "__init__.py").write_text("from torch import _no_such_name  # a backend built for another torch\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError) as error:
        _need("loramix_broken_backend", "quantize=int8")
    message = str(error.value)
    assert "the 'loramix_broken_backend' package is installed but importing it fails" in message, message
    assert "cannot import name '_no_such_name' from 'torch'" in message and "\n" not in message

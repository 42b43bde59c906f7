"""The bad-input corpus: every broken file or argument gives a LoramixError with a clear message, the CLI prints one
line and exits 1 without a traceback, and nothing half-written is left behind.

Each case builds its broken input from a good checkpoint or adapter in a temporary directory."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import loramix
from loramix import AdapterError, BaseModelMismatchError, CheckpointError, ConfigError, LoramixError
from loramix.experts import read_adapter

from conftest import char_tokenizer, tiny_llama


@pytest.fixture(scope="module")
def good(llama_dir, llama_experts, tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    mix = loramix.from_pretrained(llama_dir, llama_experts, tokenizer=char_tokenizer())
    mix.save(root / "ckpt")
    return {"ckpt": root / "ckpt", "adapter": llama_experts["protein"], "root": root}


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def _garbage(path):
    path.write_bytes(os.urandom(300))


def _edit_tensors(path, edit):
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def _edit_json(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _first_key(tensors, suffix):
    return next(k for k in sorted(tensors) if k.endswith(suffix))


# (name, how to break the checkpoint, error class, message)
CHECKPOINT_CASES = [
    (
        "truncated experts",
        lambda d: _truncate(d / "experts.safetensors"),
        CheckpointError,
        r"experts\.safetensors is not a readable safetensors file",
    ),
    (
        "garbage gate",
        lambda d: _garbage(d / "gate.safetensors"),
        CheckpointError,
        r"gate\.safetensors is not a readable safetensors file",
    ),
    (
        "missing experts file",
        lambda d: (d / "experts.safetensors").unlink(),
        CheckpointError,
        r"experts\.safetensors is missing",
    ),
    (
        "expert tensor of wrong shape",
        lambda d: _edit_tensors(
            d / "experts.safetensors", lambda t: t.__setitem__(_first_key(t, "q_proj.lora_A"), torch.zeros(3, 32))
        ),
        loramix.ShapeMismatchError,
        r"module 'model\.layers\.0\.self_attn\.q_proj': stacked lora_A \(3, 32\)",
    ),
    (
        "expert tensor of integer dtype",
        lambda d: _edit_tensors(
            d / "experts.safetensors",
            lambda t: t.__setitem__(_first_key(t, "q_proj.lora_B"), t[_first_key(t, "q_proj.lora_B")].long()),
        ),
        CheckpointError,
        r"'model\.layers\.0\.self_attn\.q_proj\.lora_B' has dtype torch\.int64; expected floating",
    ),
    (
        "gate tensor of integer dtype",
        lambda d: _edit_tensors(d / "gate.safetensors", lambda t: t.__setitem__("last.bias", t["last.bias"].long())),
        CheckpointError,
        r"tensor 'last\.bias' has dtype torch\.int64; expected floats",
    ),
    (
        "gate tensor missing",
        lambda d: _edit_tensors(d / "gate.safetensors", lambda t: t.pop("last.bias")),
        CheckpointError,
        r"missing tensors \['last\.bias'\]",
    ),
    (
        "unknown config key",
        lambda d: _edit_json(d / "loramix_config.json", lambda m: m.update(shiny=True)),
        CheckpointError,
        r"unknown key\(s\) \['shiny'\]",
    ),
    (
        "malformed gate field",
        lambda d: _edit_json(d / "loramix_config.json", lambda m: m["mix_config"]["gate"].update(temperature="hot")),
        CheckpointError,
        r"gate\.temperature='hot' must be a number > 0",
    ),
    (
        "config not JSON",
        lambda d: (d / "loramix_config.json").write_text("{"),
        CheckpointError,
        r"loramix_config\.json is not valid JSON",
    ),
    (
        "config missing",
        lambda d: (d / "loramix_config.json").unlink(),
        CheckpointError,
        r"loramix_config\.json is missing",
    ),
    (
        "newer format",
        lambda d: _edit_json(d / "loramix_config.json", lambda m: m.update(format_version=2)),
        CheckpointError,
        r"format_version=2, this loramix reads format_version 1",
    ),
]


@pytest.mark.parametrize(("name", "brk", "error", "message"), CHECKPOINT_CASES, ids=[c[0] for c in CHECKPOINT_CASES])
def test_broken_checkpoints(good, tmp_path, name, brk, error, message):
    path = _copy(good["ckpt"], tmp_path / "ckpt")
    brk(path)
    with pytest.raises(error, match=message):
        loramix.load(path)


def test_checkpoint_for_another_base(good):
    with pytest.raises(BaseModelMismatchError, match=r"base weights differ"):
        loramix.load(good["ckpt"], base=tiny_llama(seed=42))


ADAPTER_CASES = [
    (
        "truncated adapter",
        lambda d: _truncate(d / "adapter_model.safetensors"),
        AdapterError,
        r"adapter_model\.safetensors is not a readable safetensors file",
    ),
    (
        "missing adapter weights",
        lambda d: (d / "adapter_model.safetensors").unlink(),
        AdapterError,
        r"no adapter_model\.safetensors in",
    ),
    (
        "rank that is not a number",
        lambda d: _edit_json(d / "adapter_config.json", lambda c: c.update(r="eight")),
        AdapterError,
        r"field 'r'='eight' must be a positive number",
    ),
    (
        "adapter tensor of integer dtype",
        lambda d: _edit_tensors(
            d / "adapter_model.safetensors",
            lambda t: t.__setitem__(
                _first_key(t, "q_proj.lora_A.weight"), t[_first_key(t, "q_proj.lora_A.weight")].long()
            ),
        ),
        AdapterError,
        r"has lora_A of dtype torch\.int64",
    ),
    (
        "unexpected tensor",
        lambda d: _edit_tensors(
            d / "adapter_model.safetensors",
            lambda t: t.__setitem__("base_model.model.lm_head.weight", torch.zeros(2, 2)),
        ),
        AdapterError,
        r"unexpected tensor 'base_model\.model\.lm_head\.weight'",
    ),
]


@pytest.mark.parametrize(("name", "brk", "error", "message"), ADAPTER_CASES, ids=[c[0] for c in ADAPTER_CASES])
def test_broken_adapters(good, tmp_path, name, brk, error, message):
    path = _copy(good["adapter"], tmp_path / "adapter")
    brk(path)
    with pytest.raises(error, match=message):
        read_adapter("x", path)


def test_pickle_adapter_with_code_is_refused(good, tmp_path):
    path = _copy(good["adapter"], tmp_path / "bin")
    (path / "adapter_model.safetensors").unlink()

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save({"x": Payload()}, path / "adapter_model.bin")
    with pytest.raises(AdapterError, match="refused to unpickle"):
        read_adapter("x", path)
    assert not (tmp_path / "pwned").exists()


def test_non_finite_inputs_never_reach_the_gate(good, tmp_path):
    mix = loramix.load(good["ckpt"])
    embeds = torch.zeros(1, 3, 32)
    embeds[0, 1, 4] = float("nan")
    with pytest.raises(ConfigError, match="inputs_embeds contain NaN or infinite values"):
        mix(inputs_embeds=embeds)
    scalings = torch.full((mix.n_layers, mix.n_experts), float("inf"))
    with pytest.raises(ConfigError, match="scalings contain NaN or infinite values"):
        mix.generate(torch.tensor([[5, 6]]), scalings=scalings)
    from loramix.interop.static import export_static

    with pytest.raises(ConfigError, match="the scalings contain NaN or infinite values"):
        export_static(mix, scalings, tmp_path / "static")
    assert not (tmp_path / "static").exists() and not list(tmp_path.glob(".static*"))


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "loramix", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "300"},
    )


def _one_clean_line(result, message):
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    lines = [x for x in result.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0]


def test_cli_reports_broken_inputs_in_one_line(good, tmp_path):
    truncated = _copy(good["ckpt"], tmp_path / "truncated")
    _truncate(truncated / "experts.safetensors")
    _one_clean_line(_cli("generate", truncated, "-p", "x"), "experts.safetensors is not a readable safetensors file")
    bad_json = _copy(good["ckpt"], tmp_path / "badjson")
    (bad_json / "loramix_config.json").write_text("{")
    _one_clean_line(_cli("info", bad_json), "loramix_config.json is not valid JSON")
    other_base = _copy(good["ckpt"], tmp_path / "otherbase")
    tiny_llama(seed=7).save_pretrained(tmp_path / "other")
    _edit_json(other_base / "loramix_config.json", lambda m: m["base"].update(name_or_path=str(tmp_path / "other")))
    _one_clean_line(_cli("generate", other_base, "-p", "x"), "base weights differ")
    scalings = tmp_path / "nan.json"
    scalings.write_text("[NaN, 0, 1]")
    result = _cli("export", good["ckpt"], "--format", "static", "--scalings", scalings, "--out", tmp_path / "out")
    _one_clean_line(result, "the scalings contain NaN or infinite values")
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_every_loramix_error_is_a_loramix_error():
    for error in (AdapterError, BaseModelMismatchError, CheckpointError, ConfigError, loramix.ShapeMismatchError):
        assert issubclass(error, LoramixError)

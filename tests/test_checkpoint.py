import json
import shutil

import pytest
import torch

import loramix
from loramix import BaseModelMismatchError, CheckpointError, GateConfig, MixConfig

from conftest import load_base, make_adapter, save_model, tiny_llama


@pytest.fixture
def moved_experts(llama_experts, tmp_path):
    """Copies of the experts that the test deletes after building the model."""
    out = {}
    for name, path in llama_experts.items():
        out[name] = shutil.copytree(path, tmp_path / "experts" / name)
    return out


@pytest.mark.parametrize("depth", [1, 3])
def test_save_load_gives_identical_logits_after_experts_are_deleted(
    llama_dir, moved_experts, tmp_path, input_ids, depth
):
    config = MixConfig(gate=GateConfig(depth=depth, width=8, layerwise=True, top_k=2))
    mix = loramix.from_pretrained(llama_dir, moved_experts, config)
    with torch.no_grad():
        for p in mix.gate.parameters():  # a trained-looking gate, not the init
            p.normal_()
        want = mix(input_ids)
    mix.save(tmp_path / "ckpt")
    shutil.rmtree(tmp_path / "experts")
    again = loramix.load(tmp_path / "ckpt")
    with torch.no_grad():
        got = again(input_ids)
    assert torch.equal(got.logits, want.logits) and torch.equal(got.scalings, want.scalings)
    assert again.config == mix.config and again.expert_names == mix.expert_names
    assert again.layer_names == mix.layer_names


def test_gpt2_round_trip(gpt2_dir, gpt2_experts, tmp_path, input_ids):
    mix = loramix.from_pretrained(gpt2_dir, gpt2_experts, MixConfig(gate=GateConfig(layerwise=True)))
    with torch.no_grad():
        want = mix(input_ids).logits
    again = loramix.load(mix.save(tmp_path / "g"))
    with torch.no_grad():
        assert torch.equal(again(input_ids).logits, want)


def test_layout_and_format_version(llama_dir, llama_experts, tmp_path):
    mix = loramix.from_pretrained(llama_dir, llama_experts)
    mix.save(tmp_path / "ckpt")
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == [".loramix-written.json", "experts.safetensors", "gate.safetensors", "loramix_config.json"]
    manifest = json.loads((tmp_path / "ckpt" / ".loramix-written.json").read_text())
    assert manifest["files"] == files[1:]  # what the save wrote: the files it may replace next time
    meta = json.loads((tmp_path / "ckpt" / "loramix_config.json").read_text())
    assert meta["format_version"] == 1
    assert [e["name"] for e in meta["experts"]] == ["protein", "math", "qa"]
    assert meta["experts"][1]["adapter_config"]["use_rslora"] is True
    assert meta["layers"][5] == {"module": "model.layers.0.mlp.up_proj", "ranks": [0, 0, 3], "scales": [0, 0, 2.0]}
    assert meta["base"]["name_or_path"] == str(llama_dir.resolve())
    assert set(meta["base"]["fingerprint"]["tensors"]) == {
        "input_embeddings",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.mlp.up_proj.weight",
    }
    # the depth-1 gate is saved (PEFT's save_pretrained drops it)
    from safetensors.torch import load_file

    assert set(load_file(str(tmp_path / "ckpt" / "gate.safetensors"))) == {"last.weight", "last.bias"}


def test_loading_on_another_base_fails_clearly(llama_dir, llama_experts, tmp_path):
    mix = loramix.from_pretrained(llama_dir, llama_experts)
    mix.save(tmp_path / "ckpt")
    other = tiny_llama(seed=99)  # same architecture and sizes, different weights
    with pytest.raises(BaseModelMismatchError, match=r"base weights differ.*input_embeddings"):
        loramix.load(tmp_path / "ckpt", base=other)
    bigger = tiny_llama(num_hidden_layers=3)
    with pytest.raises(BaseModelMismatchError, match=r"num_hidden_layers=2.*num_hidden_layers=3"):
        loramix.load(tmp_path / "ckpt", base=bigger)
    # the same base in another dtype is the same base
    again = loramix.load(tmp_path / "ckpt", base=load_base(llama_dir).to(torch.bfloat16))
    assert again.dtype == torch.bfloat16 and again.model.model.layers[0].self_attn.q_proj.lora_A.dtype == torch.bfloat16


def test_base_override_and_missing_base(llama_dir, llama_experts, tmp_path, input_ids):
    copy_dir = shutil.copytree(llama_dir, tmp_path / "base_copy")
    mix = loramix.from_pretrained(copy_dir, llama_experts)
    mix.save(tmp_path / "ckpt")
    shutil.rmtree(copy_dir)
    with pytest.raises(CheckpointError, match=r"base model directory .*base_copy no longer exists.*base="):
        loramix.load(tmp_path / "ckpt")
    again = loramix.load(tmp_path / "ckpt", base=llama_dir)
    with torch.no_grad():
        assert torch.equal(again(input_ids).logits, mix(input_ids).logits)


def test_in_memory_base_needs_base_on_load_or_include_base(llama_experts, tmp_path, input_ids):
    base = tiny_llama(seed=0)
    save_model(tiny_llama(seed=0), tmp_path / "unused")
    mix = loramix.from_pretrained(base, llama_experts)
    mix.save(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match=r"records no base model.*base="):
        loramix.load(tmp_path / "ckpt")
    mix.save(tmp_path / "full", include_base=True)
    again = loramix.load(tmp_path / "full")
    with torch.no_grad():
        assert torch.equal(again(input_ids).logits, mix(input_ids).logits)
    assert isinstance(mix.model.model.layers[0].self_attn.q_proj, loramix.MixedLoRALinear)  # restored after saving


def test_failed_save_leaves_nothing_and_keeps_the_old_checkpoint(llama_dir, llama_experts, tmp_path, monkeypatch):
    mix = loramix.from_pretrained(llama_dir, llama_experts)
    target = tmp_path / "ckpt"
    mix.save(target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    import loramix.checkpoint as ckpt

    real = ckpt.save_tensors

    def failing(tensors, path, metadata=None):  # the gate file is written, then the disk fills up
        if path.name == "experts.safetensors":
            raise OSError("disk full")
        real(tensors, path, metadata)

    monkeypatch.setattr(ckpt, "save_tensors", failing)
    with torch.no_grad():
        mix.gate.last.weight.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        mix.save(target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp dir left behind
    with pytest.raises(OSError):
        mix.save(tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()


def test_refuses_to_overwrite_a_directory_that_is_not_a_checkpoint(llama_dir, llama_experts, tmp_path):
    mix = loramix.from_pretrained(llama_dir, llama_experts)
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.tex").write_text("years of work")
    with pytest.raises(CheckpointError, match=r"without loramix_config\.json, so loramix did not write it; refusing"):
        mix.save(tmp_path / "precious")
    assert (tmp_path / "precious" / "thesis.tex").read_text() == "years of work"
    mix.save(tmp_path / "c")
    with pytest.raises(CheckpointError, match="already exists"):
        mix.save(tmp_path / "c", overwrite=False)


def _saved(llama_dir, llama_experts, tmp_path):
    mix = loramix.from_pretrained(llama_dir, llama_experts)
    return mix.save(tmp_path / "ckpt")


def _edit_meta(path, edit):
    meta = json.loads((path / "loramix_config.json").read_text())
    edit(meta)
    (path / "loramix_config.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.update(format_version=7), r"format_version=7, this loramix reads format_version 1"),
        (lambda m: m.update(extra=1), r"unknown key\(s\) \['extra'\]"),
        (lambda m: m["mix_config"]["gate"].update(depth=0), r"gate\.depth=0"),
        (lambda m: m["mix_config"].update(bogus=True), r"mix_config: unknown key\(s\) \['bogus'\]"),
        (lambda m: m.update(experts=[]), r"'experts' must be a non-empty list"),
        (lambda m: m["layers"][0].update(ranks=[4, 2]), r"layers\[0\].*3 non-negative integer ranks"),
        (lambda m: m["layers"][0].update(module="model.layers.9.q"), r"module 'model\.layers\.9\.q' does not exist"),
        (lambda m: m["layers"][0].update(ranks=[4, 2, 2]), r"stacked lora_A \(9, 32\).*expected \[8, 32\]"),
    ],
)
def test_malformed_config_is_reported_with_the_file(llama_dir, llama_experts, tmp_path, edit, message):
    path = _saved(llama_dir, llama_experts, tmp_path)
    _edit_meta(path, edit)
    with pytest.raises(loramix.LoramixError, match=message) as info:
        loramix.load(path)
    assert "loramix_config.json" in str(info.value)


def test_corrupt_or_missing_tensor_files(llama_dir, llama_experts, tmp_path):
    path = _saved(llama_dir, llama_experts, tmp_path)
    data = (path / "gate.safetensors").read_bytes()
    (path / "gate.safetensors").write_bytes(data[:20])
    with pytest.raises(CheckpointError, match=r"gate\.safetensors is not a readable safetensors file"):
        loramix.load(path)
    (path / "gate.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"gate\.safetensors is missing"):
        loramix.load(path)
    (path / "experts.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"experts\.safetensors is missing"):
        loramix.load(path)
    with pytest.raises(CheckpointError, match="not a directory"):
        loramix.load(tmp_path / "nothing")


def test_gate_tensor_of_wrong_shape(llama_dir, llama_experts, tmp_path):
    from safetensors.torch import load_file, save_file

    path = _saved(llama_dir, llama_experts, tmp_path)
    gate = load_file(str(path / "gate.safetensors"))
    gate["last.weight"] = torch.zeros(5, 32)
    save_file(gate, str(path / "gate.safetensors"))
    message = r"'last\.weight' has shape \(5, 32\), the gate for 3 experts and 12 adapted modules expects \(3, 32\)"
    with pytest.raises(CheckpointError, match=message):
        loramix.load(path)


def test_expert_with_different_targets_still_round_trips(llama_dir, tmp_path, input_ids):
    only_v = make_adapter(llama_dir, tmp_path / "v", targets=["v_proj"], r=2, seed=8)
    only_up = make_adapter(llama_dir, tmp_path / "up", targets=["up_proj", "down_proj"], r=3, seed=9)
    mix = loramix.from_pretrained(llama_dir, {"v": only_v, "up": only_up})
    assert mix.n_layers == 6
    again = loramix.load(mix.save(tmp_path / "ck"))
    with torch.no_grad():
        assert torch.equal(again(input_ids).logits, mix(input_ids).logits)


def test_fingerprint_positions_of_a_large_tensor():
    """A real model's embedding table has more than 2**24 elements (SmolLM2: 49152 x 576), where float32 positions
    overran the end; the positions stay in range, evenly spaced, from the first element to the last."""
    from loramix.checkpoint import sample_index

    for numel in (2**24 + 1, 49152 * 576, 152064 * 3584):
        index = sample_index(numel)
        assert index[0] == 0 and index[-1] == numel - 1
        assert (index.diff() > 0).all() and int(index.max()) < numel
    # small tensors keep the positions that earlier checkpoints recorded
    assert sample_index(10496).tolist() == torch.linspace(0, 10495, 64).round().long().tolist()

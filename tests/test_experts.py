import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import loramix
from loramix import AdapterError, ShapeMismatchError
from loramix.experts import read_adapter, stack_experts

from conftest import load_base, make_adapter


def test_reads_peft_adapter_with_scales(llama_experts):
    protein = read_adapter("protein", llama_experts["protein"])
    assert set(protein.modules) == {
        f"model.layers.{i}.{kind}"
        for i in range(2)
        for kind in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj")
    }
    update = protein.modules["model.layers.0.self_attn.q_proj"]
    assert update.lora_A.shape == (4, 32) and update.lora_B.shape == (32, 4)
    assert update.scale == pytest.approx(8 / 4)
    rs = read_adapter("math", llama_experts["math"])
    assert rs.modules["model.layers.1.mlp.gate_proj"].scale == pytest.approx(3 / math.sqrt(2))  # rsLoRA


def test_scales_match_peft_lora_layers(llama_dir, llama_experts):
    from peft import PeftModel

    for name in ("protein", "math", "qa"):
        peft_model = PeftModel.from_pretrained(load_base(llama_dir), str(llama_experts[name]))
        ours = read_adapter(name, llama_experts[name])
        layer = peft_model.base_model.model.model.layers[1].self_attn.v_proj
        assert ours.modules["model.layers.1.self_attn.v_proj"].scale == pytest.approx(layer.scaling["default"])
        assert torch.equal(ours.modules["model.layers.1.self_attn.v_proj"].lora_A, layer.lora_A["default"].weight)


def test_union_of_targets_with_zero_rank_where_an_expert_is_absent(llama_dir, llama_experts):
    experts = [read_adapter(n, p) for n, p in llama_experts.items()]
    stacked = stack_experts(experts, load_base(llama_dir))
    # named_modules order, union of targets: qa adds up_proj, which the others do not touch
    assert list(stacked)[:6] == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.k_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.0.self_attn.o_proj",
        "model.layers.0.mlp.gate_proj",
        "model.layers.0.mlp.up_proj",
    ]
    assert len(stacked) == 12
    assert stacked["model.layers.0.mlp.up_proj"].ranks == [0, 0, 3]
    assert stacked["model.layers.0.self_attn.k_proj"].ranks == [4, 2, 0]
    assert stacked["model.layers.0.self_attn.q_proj"].ranks == [4, 2, 3]
    assert stacked["model.layers.0.self_attn.q_proj"].lora_A.shape == (9, 32)
    assert stacked["model.layers.0.self_attn.q_proj"].lora_B.shape == (32, 9)


def test_rank_and_alpha_patterns(llama_dir, tmp_path):
    path = make_adapter(
        llama_dir,
        tmp_path / "pattern",
        r=4,
        alpha=8,
        seed=5,
        rank_pattern={"v_proj": 2},
        alpha_pattern={"q_proj": 1},
    )
    expert = read_adapter("p", path)
    assert expert.modules["model.layers.0.self_attn.v_proj"].lora_A.shape[0] == 2
    assert expert.modules["model.layers.0.self_attn.v_proj"].scale == pytest.approx(8 / 2)
    assert expert.modules["model.layers.0.self_attn.q_proj"].scale == pytest.approx(1 / 4)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_config(path, **changes):
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"use_dora": True}, "use_dora=True: DoRA"),
        ({"bias": "all"}, "bias='all'"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"peft_type": "IA3"}, "peft_type=IA3"),
        ({"r": 0}, "field 'r'=0"),
    ],
)
def test_unsupported_adapter_options_name_the_adapter_and_option(llama_experts, tmp_path, changes, message):
    path = _copy(llama_experts["protein"], tmp_path / "bad")
    _edit_config(path, **changes)
    with pytest.raises(AdapterError, match=r"expert 'odd'.*adapter_config\.json.*" + message.split(":")[0]):
        read_adapter("odd", path)


def test_embedding_targets_are_refused(llama_dir, tmp_path):
    path = make_adapter(llama_dir, tmp_path / "emb", targets=["embed_tokens", "q_proj"], seed=3)
    with pytest.raises(AdapterError, match=r"expert 'emb'.*embedding targets are not supported"):
        read_adapter("emb", path)


def test_shape_mismatch_names_the_module_and_both_shapes(llama_experts, tmp_path):
    from conftest import tiny_llama

    wider = tiny_llama(hidden_size=48, num_attention_heads=4)
    experts = [read_adapter("protein", llama_experts["protein"])]
    with pytest.raises(ShapeMismatchError, match=r"module 'model\.layers\.0\.self_attn\.q_proj'.*\(4, 32\).*48 -> 48"):
        stack_experts(experts, wider)


def test_module_missing_from_the_base_is_named(gpt2_dir, llama_experts):
    experts = [read_adapter("protein", llama_experts["protein"])]
    with pytest.raises(AdapterError, match=r"expert 'protein'.*adapts module 'model\.layers\.0\..*does not have"):
        stack_experts(experts, load_base(gpt2_dir))


def test_missing_and_corrupt_files_are_clear(llama_experts, tmp_path):
    with pytest.raises(AdapterError, match=r"expert 'x'.*is not a directory"):
        read_adapter("x", tmp_path / "nowhere")
    path = _copy(llama_experts["protein"], tmp_path / "nojson")
    (path / "adapter_config.json").unlink()
    with pytest.raises(AdapterError, match=r"adapter_config\.json is missing"):
        read_adapter("x", path)
    path = _copy(llama_experts["protein"], tmp_path / "badjson")
    (path / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match=r"is not valid JSON"):
        read_adapter("x", path)
    path = _copy(llama_experts["protein"], tmp_path / "trunc")
    data = (path / "adapter_model.safetensors").read_bytes()
    (path / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterError, match=r"adapter_model\.safetensors is not a readable safetensors file"):
        read_adapter("x", path)
    path = _copy(llama_experts["protein"], tmp_path / "noweights")
    (path / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match=r"no adapter_model\.safetensors"):
        read_adapter("x", path)


def test_tensor_of_wrong_rank_against_config(llama_experts, tmp_path):
    path = _copy(llama_experts["protein"], tmp_path / "rank")
    tensors = load_file(str(path / "adapter_model.safetensors"))
    key = next(k for k in tensors if k.endswith("q_proj.lora_A.weight"))
    tensors[key] = tensors[key][:3]
    save_file(tensors, str(path / "adapter_model.safetensors"))
    with pytest.raises(ShapeMismatchError, match=r"q_proj' has lora_A \(3, 32\) and lora_B \(32, 4\)"):
        read_adapter("x", path)


def test_pickle_adapter_is_read_only_with_weights_only(llama_experts, tmp_path):
    path = _copy(llama_experts["protein"], tmp_path / "bin")
    tensors = load_file(str(path / "adapter_model.safetensors"))
    (path / "adapter_model.safetensors").unlink()
    torch.save(tensors, path / "adapter_model.bin")
    expert = read_adapter("bin", path)  # plain tensors load with weights_only=True
    assert len(expert.modules) == 10

    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"x": Evil()}, path / "adapter_model.bin")
    with pytest.raises(AdapterError, match=r"refused to unpickle"):
        read_adapter("bin", path)


def test_expert_names_are_free_and_checked(llama_dir, llama_experts):
    model = loramix.from_pretrained(
        llama_dir, {"Protein mechanics": llama_experts["protein"], "ü": llama_experts["qa"]}
    )
    assert model.expert_names == ["Protein mechanics", "ü"]
    with pytest.raises(loramix.ConfigError, match="non-empty"):
        loramix.from_pretrained(llama_dir, {" ": llama_experts["qa"]})
    named = loramix.from_pretrained(llama_dir, [llama_experts["qa"], llama_experts["math"]])
    assert named.expert_names == ["qa", "math"]

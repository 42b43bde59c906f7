"""mistral.rs interop: export -> import round trip, every refusal, and the real proof: mistral.rs 0.9.5 loads the
exported directory and generates, token for token, what loramix generates."""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import loramix
from loramix import GateConfig, MixConfig
from loramix.errors import LoramixError
from loramix.interop.mistralrs import ExportError, export_mistralrs, import_xlora

from conftest import char_tokenizer, make_adapter, save_model, tiny_llama

ALL_LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NAMES = ["alpha", "beta", "gamma"]


def _randomise_gate(mix: loramix.LoraMixModel, seed: int = 0) -> None:
    """A fresh gate's last layer is initialised small; make the scalings far from uniform."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in mix.gate.parameters():
            p.normal_(0.0, 0.5)


def _mix(base, experts: dict[str, Path], config: MixConfig | None = None, **kwargs) -> loramix.LoraMixModel:
    mix = loramix.from_pretrained(base, experts, config, **kwargs)
    _randomise_gate(mix)
    return mix


@pytest.fixture(scope="module")
def named_experts(llama_experts_same_targets) -> dict[str, Path]:
    # the fixture's own names "a", "b", "c" are substrings of xlora_config.json & co: mistral.rs would mix files up
    return dict(zip(NAMES, llama_experts_same_targets))


# ---------------------------------------------------------------------- (a) round trip

ROUND_TRIP_CASES = {
    "depth1-shared": MixConfig(),
    "depth2-layerwise": MixConfig(gate=GateConfig(depth=2, layerwise=True, dropout=0.0)),
    "depth3-nobias-topk": MixConfig(
        gate=GateConfig(depth=3, layerwise=True, bias=False, top_k=2, temperature=0.7),
        scaling_pass_value=None,
        global_scaling_weight=0.8,
    ),
    "no-softmax-spv": MixConfig(gate=GateConfig(softmax=False, layerwise=True), scaling_pass_value=0.25),
}


@pytest.mark.parametrize("case", list(ROUND_TRIP_CASES))
def test_round_trip_gives_identical_logits(llama_dir, named_experts, input_ids, tmp_path, case):
    mix = _mix(llama_dir, named_experts, ROUND_TRIP_CASES[case])
    out = export_mistralrs(mix, tmp_path / "xlora", base_model_id="tiny-llama")
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["xlora_config.json", "xlora_classifier.safetensors", "ordering.json", ".loramix-written.json"]
        + [f"{n}.adapter_{kind}" for n in NAMES for kind in ("config.json", "model.safetensors")]
    )
    back = import_xlora(out, llama_dir)
    mask = torch.ones_like(input_ids)
    mask[0, :2] = 0
    with torch.no_grad():
        want = mix(input_ids, attention_mask=mask)
        got = back(input_ids, attention_mask=mask)
    assert torch.equal(got.logits, want.logits)
    assert torch.equal(got.scalings, want.scalings)
    assert back.expert_names == NAMES
    assert back.layer_names == mix.layer_names
    g, h = back.config.gate, mix.config.gate
    assert (g.depth, g.width or 32, g.layerwise, g.softmax, g.temperature, g.top_k, g.bias) == (
        h.depth,
        h.width or 32,
        h.layerwise,
        h.softmax,
        h.temperature,
        h.top_k,
        h.bias,
    )
    # the files are what mistral.rs reads: every key written, PEFT tensor names, one r/alpha per expert
    conf = json.loads((out / "xlora_config.json").read_text())
    for key in (
        "hidden_size",
        "base_model_id",
        "adapters",
        "xlora_depth",
        "xlora_size",
        "layerwise_scalings",
        "enable_softmax",
        "softmax_temperature",
        "enable_relu_and_dropout",
        "xlora_dropout_p",
        "use_bias",
        "scaling_pass_value",
        "global_scaling_weight",
        "top_k_lora",
        "enable_softmax_topk",
    ):
        assert key in conf, key
    assert conf["xlora_size"] == 32 and conf["xlora_dropout_p"] == 0.0 and conf["enable_relu_and_dropout"] is True
    ordering = json.loads((out / "ordering.json").read_text())
    assert ordering["order"] == NAMES and ordering["base_model_id"] == "tiny-llama"
    assert ordering["layers"] == {p: i for i, p in enumerate(mix.layer_names)}
    beta = json.loads((out / "beta.adapter_config.json").read_text())
    assert (beta["r"], beta["lora_alpha"], beta["target_modules"]) == (
        2,
        4,
        ["gate_proj", "k_proj", "o_proj", "q_proj", "v_proj"],
    )
    tensors = load_file(str(out / "beta.adapter_model.safetensors"))
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
    assert tensors[key].shape == (2, 32)
    original = load_file(str(named_experts["beta"] / "adapter_model.safetensors"))
    assert torch.equal(tensors[key], original[key])


def _to_original_layout(flat: Path, out: Path, style: str) -> Path:
    """Rewrite an exported directory in the layout the X-LoRA authors publish: one sub-folder per adapter named
    after it, the classifier as the original xlora package ("inner.{0,3,..}" counting ReLU and Dropout modules) or
    PEFT ("internal_xlora_classifier.layers.{0,2,..}") named its tensors, no ordering file."""
    out.mkdir()
    conf = json.loads((flat / "xlora_config.json").read_text())
    for name in conf["adapters"]:
        (out / name).mkdir()
        (out / name / "adapter_config.json").write_bytes((flat / f"{name}.adapter_config.json").read_bytes())
        (out / name / "adapter_model.safetensors").write_bytes(
            (flat / f"{name}.adapter_model.safetensors").read_bytes()
        )
    gate = load_file(str(flat / "xlora_classifier.safetensors"))
    depth = conf["xlora_depth"]
    renamed = {}
    for key, value in gate.items():
        part, param = key.rsplit(".", 1)
        index = depth - 1 if part == "last" else int(part.split(".")[1])
        if style == "xlora":
            new = "last" if part == "last" else f"inner.{3 * index}"  # Linear, ReLU, Dropout per inner layer
        else:
            new = f"internal_xlora_classifier.layers.{2 * index}"  # Linear, ReLU (no dropout module at p=0)
        renamed[f"{new}.{param}"] = value
    save_file(renamed, str(out / "xlora_classifier.safetensors"))
    conf["adapters"] = {name: f"some-user/some-xlora/{name}" for name in conf["adapters"]}
    (out / "xlora_config.json").write_text(json.dumps(conf))
    return out


@pytest.mark.parametrize("style", ["xlora", "peft"])
def test_import_of_the_original_layout(llama_dir, named_experts, input_ids, tmp_path, style):
    mix = _mix(llama_dir, named_experts, MixConfig(gate=GateConfig(depth=3, layerwise=True)))
    flat = export_mistralrs(mix, tmp_path / "flat", base_model_id="tiny-llama")
    original = _to_original_layout(flat, tmp_path / "original", style)
    back = import_xlora(original, llama_dir)
    with torch.no_grad():
        assert torch.equal(back(input_ids).logits, mix(input_ids).logits)
    assert back.expert_names == NAMES


def test_import_refuses_broken_directories(llama_dir, named_experts, tmp_path):
    mix = _mix(llama_dir, named_experts, MixConfig(gate=GateConfig(depth=2)))
    out = export_mistralrs(mix, tmp_path / "x", base_model_id="tiny-llama")
    conf = json.loads((out / "xlora_config.json").read_text())

    (out / "xlora_config.json").write_text(json.dumps({**conf, "enable_relu_and_dropout": False}))
    with pytest.raises(LoramixError, match=r"xlora_config\.json: xlora_depth=2 without enable_relu_and_dropout"):
        import_xlora(out, llama_dir)
    (out / "xlora_config.json").write_text(json.dumps({**conf, "xlora_depth": 1}))
    with pytest.raises(LoramixError, match="xlora_depth=1 but the classifier file holds 2 linear layer"):
        import_xlora(out, llama_dir)
    (out / "xlora_config.json").write_text(json.dumps(conf))
    (out / "gamma.adapter_model.safetensors").unlink()
    with pytest.raises(LoramixError, match=r"no file for adapter 'gamma'; expected gamma\.adapter_model\.safetensors"):
        import_xlora(out, llama_dir)
    with pytest.raises(LoramixError, match="is not a directory"):
        import_xlora(tmp_path / "missing", llama_dir)


# ---------------------------------------------------------------------- (b) refusals


def _lora_only(adapter: Path) -> Path:
    """PEFT also saves the base lm_head weight of an adapter on lm_head; keep the LoRA tensors only."""
    path = adapter / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(str(path)).items() if ".lora_" in k}, str(path))
    return adapter


def _refusal_cases(llama_dir: Path, gpt2_dir: Path, experts: dict[str, Path], root: Path):
    """(id, build the mixture, expected message pattern). Experts are built on demand (each case is ~0.3 s)."""

    def with_extra(name: str, **adapter_kwargs):
        extra = make_adapter(llama_dir, root / name, seed=7, **adapter_kwargs)
        return {**experts, name: extra}

    return {
        "substring-names": (
            lambda: _mix(llama_dir, {"math": experts["alpha"], "mat": experts["beta"]}),
            r"expert name 'mat' is a substring of the file name 'math\.adapter_config\.json'",
        ),
        "name-in-fixed-files": (
            lambda: _mix(llama_dir, {"a": experts["alpha"], "beta": experts["beta"]}),
            r"expert name 'a' is a substring of the file name 'xlora_config\.json'",
        ),
        "slash-in-name": (
            lambda: _mix(llama_dir, {"math/v2": experts["alpha"], "beta": experts["beta"]}),
            r"expert name 'math/v2' is not a safe file name",
        ),
        "rslora": (
            lambda: _mix(llama_dir, with_extra("delta", use_rslora=True)),
            r"expert 'delta': adapter_config use_rslora=true",
        ),
        "different-targets": (
            lambda: _mix(llama_dir, with_extra("delta", targets=["q_proj", "v_proj"])),
            r"experts 'alpha' and 'delta' adapt different modules .*same target_modules",
        ),
        "partial-layers": (
            lambda: _mix(llama_dir, {"delta": make_adapter(llama_dir, root / "delta", layers_to_transform=[0])}),
            r"module 'model\.layers\.1\.self_attn\.q_proj' is not adapted although other 'q_proj' modules are",
        ),
        "lm-head": (
            lambda: _mix(
                llama_dir,
                {
                    "delta": _lora_only(make_adapter(llama_dir, root / "d", targets=["q_proj", "lm_head"], seed=1)),
                    "epsilon": _lora_only(make_adapter(llama_dir, root / "e", targets=["q_proj", "lm_head"], seed=2)),
                },
            ),
            r"module 'lm_head' \(the LM head\) is an expert target; mistral\.rs cannot adapt lm_head",
        ),
        "rank-pattern": (
            lambda: _mix(llama_dir, with_extra("delta", rank_pattern={"q_proj": 2})),
            r"expert 'delta': ranks \[2, 4\] differ between modules \(rank_pattern\)",
        ),
        "alpha-pattern": (
            lambda: _mix(llama_dir, with_extra("delta", alpha_pattern={"q_proj": 2})),
            r"expert 'delta': scales alpha/r .* differ between modules \(alpha_pattern\)",
        ),
        "deep-gate-width": (
            lambda: _mix(llama_dir, experts, MixConfig(gate=GateConfig(depth=2, width=16))),
            r"gate\.width=16 with gate\.depth=2: .*width == hidden size",
        ),
        "topk-softmax": (
            lambda: _mix(llama_dir, experts, MixConfig(gate=GateConfig(top_k=2, topk_softmax=True))),
            r"gate\.topk_softmax=true: mistral\.rs refuses enable_softmax_topk",
        ),
        "truncated-scaling-pass": (
            lambda: _mix(llama_dir, experts, MixConfig(scaling_layer=1)),
            r"scaling_layer=1: mistral\.rs always runs the full scaling pass",
        ),
        "architecture": (
            lambda: _mix(gpt2_dir, {"left": make_adapter(gpt2_dir, root / "left")}),
            r"base model_type='gpt2': mistral\.rs 0\.9\.5 cannot serve it with X-LoRA",
        ),
        "llama-biases": (
            lambda: _mix(tiny_llama(attention_bias=True), {"delta": make_adapter(llama_dir, root / "delta", seed=3)}),
            r"base config attention_bias=true: mistral\.rs's X-LoRA Llama loads no biases",
        ),
    }


REFUSALS = [
    "substring-names",
    "name-in-fixed-files",
    "slash-in-name",
    "rslora",
    "different-targets",
    "partial-layers",
    "lm-head",
    "rank-pattern",
    "alpha-pattern",
    "deep-gate-width",
    "topk-softmax",
    "truncated-scaling-pass",
    "architecture",
    "llama-biases",
]


@pytest.mark.parametrize("case", REFUSALS)
def test_export_refuses_what_mistralrs_cannot_represent(llama_dir, gpt2_dir, named_experts, tmp_path, case):
    build, pattern = _refusal_cases(llama_dir, gpt2_dir, named_experts, tmp_path)[case]
    mix = build()
    out = tmp_path / "out"
    with pytest.raises(ExportError, match=pattern) as info:
        export_mistralrs(mix, out, base_model_id="tiny-llama")
    assert "\n" not in str(info.value)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temporary directory left behind


def test_export_refuses_bad_arguments_and_tokenizers(llama_dir, named_experts, tmp_path):
    mix = _mix(llama_dir, named_experts)
    with pytest.raises(ExportError, match="base_model_id='' must be a non-empty string"):
        export_mistralrs(mix, tmp_path / "x", base_model_id="")
    with pytest.raises(ExportError, match="the base must go to another directory"):
        export_mistralrs(mix, tmp_path / "x", base_model_id="b", with_base=tmp_path / "x")
    with pytest.raises(ExportError, match="is the directory the base model was loaded from"):
        export_mistralrs(mix, tmp_path / "x", base_model_id="b", with_base=llama_dir)
    with pytest.raises(ExportError, match="with_base: the model has no fast tokenizer"):
        export_mistralrs(mix, tmp_path / "x", base_model_id="b", with_base=tmp_path / "base")
    mix.tokenizer = char_tokenizer()  # its decoder is Fuse: mistral.rs cannot determine the decoder type
    with pytest.raises(ExportError, match=r"with_base: tokenizer\.json has decoder 'Fuse'; mistral\.rs 0\.9\.5 needs"):
        export_mistralrs(mix, tmp_path / "x", base_model_id="b", with_base=tmp_path / "base")
    assert not (tmp_path / "x").exists() and not (tmp_path / "base").exists()


# ---------------------------------------------------------------------- (c) mistral.rs itself


def byte_level_tokenizer():
    """A byte-level BPE tokenizer (ByteLevel pre-tokenizer and decoder, as mistral.rs needs) trained on the printable
    ASCII characters, with the vocabulary capped at its alphabet: no merges, so every character is one token and the
    text mistral.rs returns maps back to exactly one token sequence. No special tokens, no BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    sentences = [string.ascii_letters + string.digits + string.punctuation + " ", "The quick brown fox jumps."]
    tok.train_from_iterator(sentences, trainers.BpeTrainer(vocab_size=1, show_progress=False))
    return tok, PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.fixture(scope="module")
def byte_tokenizer():
    return byte_level_tokenizer()


MISTRALRS_CASES = {
    # untied base, deeper layer-wise gate, experts of different ranks and alphas
    "untied-depth2-layerwise": (False, MixConfig(gate=GateConfig(depth=2, layerwise=True)), [(4, 8), (2, 4), (4, 16)]),
    # tied base (lm_head.weight must be stored), shared top-k gate, scaling-pass value and global weight;
    # equal ranks and alphas (mistral.rs then takes its stacked path)
    "tied-topk-spv-gsw": (
        True,
        MixConfig(gate=GateConfig(top_k=2, temperature=0.5), scaling_pass_value=0.2, global_scaling_weight=0.7),
        [(4, 8), (4, 8), (4, 8)],
    ),
}


@pytest.mark.parametrize("case", list(MISTRALRS_CASES))
def test_mistralrs_generates_the_same_tokens(byte_tokenizer, tmp_path, monkeypatch, case):
    from mistralrs import Architecture, CompletionRequest, ModelDType, Runner, Which

    monkeypatch.setenv("MISTRALRS_CPU_KV_F32", "1")  # else an f16 KV cache on CPU
    tok, hf_tok = byte_tokenizer
    assert json.loads(tok.to_str())["model"]["merges"] == []
    tied, config, experts = MISTRALRS_CASES[case]
    vocab = tok.get_vocab_size()
    base = tiny_llama(
        vocab_size=vocab, tie_word_embeddings=tied, bos_token_id=None, eos_token_id=None, pad_token_id=None
    )
    base_dir = save_model(base, tmp_path / "hf")
    hf_tok.save_pretrained(str(base_dir))
    adapters = {
        name: make_adapter(base_dir, tmp_path / name, targets=ALL_LLAMA_LINEARS, r=r, alpha=a, seed=i + 1)
        for i, (name, (r, a)) in enumerate(zip(NAMES, experts))
    }
    mix = _mix(base_dir, adapters, config)
    mistralrs_base = tmp_path / "base"
    out = export_mistralrs(mix, tmp_path / "xlora", base_model_id=str(mistralrs_base), with_base=mistralrs_base)
    # a second export replaces both directories: they are the export's own (their manifests say so)
    out = export_mistralrs(mix, tmp_path / "xlora", base_model_id=str(mistralrs_base), with_base=mistralrs_base)
    config_json = json.loads((mistralrs_base / "config.json").read_text())
    assert config_json["rope_theta"] == 10000.0
    assert "lm_head.weight" in load_file(str(mistralrs_base / "model.safetensors"))

    n, prompt = 24, "T"  # one prompt token: longer prompt steps fail upstream for safetensors X-LoRA models
    prompt_ids = torch.tensor([tok.encode(prompt).ids])
    assert prompt_ids.shape == (1, 1)
    want = mix.generate(prompt_ids, max_new_tokens=n, eos_token_id=[]).sequences[0, 1:].tolist()
    with torch.no_grad(), mix.experts_disabled():
        plain = mix.model.generate(prompt_ids, max_new_tokens=n, do_sample=False, eos_token_id=None)[0, 1:].tolist()
    assert plain != want  # the experts and the gate decide the tokens, not the base alone

    runner = Runner(
        which=Which.XLora(
            model_id=str(mistralrs_base),
            xlora_model_id=str(out),
            order=str(out / "ordering.json"),
            arch=Architecture.Llama,
            dtype=ModelDType.F32,
        ),
        max_seqs=1,
    )
    response = runner.send_completion_request(
        CompletionRequest(prompt=prompt, model="loramix", max_tokens=n, temperature=0.0, ignore_eos=True)
    )
    text = response.choices[0].text
    got = tok.encode(text).ids
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (1, n)
    assert got == want, f"mistral.rs {got} != loramix {want}"
    assert text == tok.decode(want)

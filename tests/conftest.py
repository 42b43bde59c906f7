"""Tiny randomly initialised models and real PEFT LoRA adapters saved to tmp dirs.

Models (a few hundred KB): a Llama (`llama_dir`) and a GPT-2 (`gpt2_dir`, Conv1D layers, backbone `.transformer`).
`make_adapter(base_dir, targets, r, alpha, seed, ...)` trains nothing: it saves a PEFT LoRA adapter with random,
non-zero A and B (init_lora_weights=False), so every expert really changes the output.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# one thread per xdist worker (two workers share CI's two cores), two in a single-process run
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads()))

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]


def tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    kwargs = dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    kwargs.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**kwargs))
    model.config.use_cache = False
    return model.eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=128, bos_token_id=1, eos_token_id=2)
    model = GPT2LMHeadModel(config)
    model.config.use_cache = False
    return model.eval()


def random_gate(model, seed: int = 0):
    """Give the gate random N(0, 1) weights (a sharp, input-dependent gate: routing changes from token to token)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.gate.parameters():
            p.normal_()
    return model


def save_model(model, path: Path) -> Path:
    model.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    return save_model(tiny_llama(), tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory) -> Path:
    return save_model(tiny_gpt2(), tmp_path_factory.mktemp("gpt2"))


def load_base(path: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path))
    model.config.use_cache = False
    return model.eval()


def make_adapter(
    base_dir: Path,
    out_dir: Path,
    targets=None,
    r: int = 4,
    alpha: float = 8,
    seed: int = 0,
    **lora_kwargs,
) -> Path:
    """Save a real PEFT LoRA adapter with random non-zero weights to out_dir."""
    from peft import LoraConfig, get_peft_model

    base = load_base(base_dir)
    if targets is None:
        targets = GPT2_TARGETS if base.config.model_type == "gpt2" else LLAMA_TARGETS
    torch.manual_seed(seed)
    config = LoraConfig(
        r=r, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False, lora_dropout=0.0, **lora_kwargs
    )
    peft_model = get_peft_model(base, config)
    with torch.no_grad():  # scale B up a little so expert effects are clearly visible in logits
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.3)
    peft_model.save_pretrained(str(out_dir))
    return out_dir


@pytest.fixture(scope="session")
def llama_experts(llama_dir, tmp_path_factory) -> dict[str, Path]:
    """Three experts on the tiny Llama with different ranks, alphas and targets (one uses rsLoRA)."""
    root = tmp_path_factory.mktemp("llama_experts")
    return {
        "protein": make_adapter(llama_dir, root / "protein", r=4, alpha=8, seed=1),
        "math": make_adapter(llama_dir, root / "math", r=2, alpha=3, seed=2, use_rslora=True),
        "qa": make_adapter(llama_dir, root / "qa", targets=["q_proj", "v_proj", "up_proj"], r=3, alpha=6, seed=3),
    }


@pytest.fixture(scope="session")
def llama_experts_same_targets(llama_dir, tmp_path_factory) -> list[Path]:
    """Experts that PEFT's XLoraModel can load (all on the same targets), for reference parity."""
    root = tmp_path_factory.mktemp("llama_experts_peft")
    return [
        make_adapter(llama_dir, root / "a", r=4, alpha=8, seed=11),
        make_adapter(llama_dir, root / "b", r=2, alpha=4, seed=12),
        make_adapter(llama_dir, root / "c", r=4, alpha=16, seed=13),
    ]


@pytest.fixture(scope="session")
def gpt2_experts(gpt2_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gpt2_experts")
    return {
        "left": make_adapter(gpt2_dir, root / "left", r=4, alpha=8, seed=21),
        "right": make_adapter(gpt2_dir, root / "right", targets=["c_attn", "c_fc"], r=2, alpha=2, seed=22),
    }


@pytest.fixture
def input_ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    return torch.randint(3, 96, (2, 7), generator=g)


def char_tokenizer(add_bos: bool = True, last: str = "{", without: str = ""):
    """A character-level transformers tokenizer with 96 ids: <pad>=0, <s>=1, </s>=2, then newline and 92 printable
    characters (space to `last`, except those in `without`; "~" gives every printable ASCII character, 99 ids, as
    JSON needs). It adds <s> in front, as Llama tokenizers do (unless add_bos=False, as GPT-2's does not)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = ["\n"] + [chr(c) for c in range(32, ord(last) + 1) if chr(c) not in without]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", padding_side="left"
    )


@pytest.fixture(scope="session")
def tokenizer():
    return char_tokenizer()


def run_cli(*args, cwd=None):
    """`python -m loramix ARGS` in a subprocess (wide terminal, 300 s at most): the CLI as a user runs it."""
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "loramix", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "300"},
        cwd=cwd,
    )


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Every test starts with torch.compile's caches empty: the decode step is compiled per test with other shapes,
    and over the whole suite one process would reach dynamo's recompile limit (8 per function), where a fullgraph
    compile fails hard (test_serve_load's compiled slots did, after the context-gate tests)."""
    torch._dynamo.reset()
    yield

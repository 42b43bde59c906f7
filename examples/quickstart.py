"""Quickstart on a tiny random Llama: two PEFT LoRA experts, a gate, a dual-pass forward, save and load.

Runs offline in a few seconds: everything is created here, nothing is downloaded.
    python examples/quickstart.py
"""

import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import loramix


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def random_expert(base_dir: Path, out: Path, seed: int, rank: int) -> Path:
    """A real PEFT LoRA adapter dir (random weights stand in for a trained expert)."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM.from_pretrained(base_dir)
    lora = LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj", "o_proj", "gate_proj"], init_lora_weights=False
    )
    get_peft_model(model, lora).save_pretrained(out)
    return out


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="loramix-quickstart-"))
    tiny_llama().save_pretrained(work / "base")
    experts = {
        "protein": random_expert(work / "base", work / "protein", seed=1, rank=8),
        "math": random_expert(work / "base", work / "math", seed=2, rank=4),
    }
    model = loramix.from_pretrained(
        work / "base",
        experts=experts,
        config=loramix.MixConfig(gate=loramix.GateConfig(depth=2, width=32, softmax=True, layerwise=True)),
    )
    print(model.extra_repr())
    input_ids = torch.randint(0, 128, (2, 10))
    with torch.inference_mode():
        out = model(input_ids, attention_mask=torch.ones_like(input_ids))
    print("logits", tuple(out.logits.shape), "scalings [B,T,L,N]", tuple(out.scalings.shape))
    mean = out.scalings.mean(dim=(0, 1, 2))
    print("mean scaling per expert:", {n: round(float(v), 3) for n, v in zip(model.expert_names, mean)})

    ckpt = model.save(work / "ckpt")
    for path in experts.values():  # the checkpoint is self-contained
        for f in path.iterdir():
            f.unlink()
    again = loramix.load(ckpt)
    with torch.inference_mode():
        assert torch.equal(again(input_ids).logits, out.logits)
    print(f"saved and re-loaded {ckpt}: identical logits")


if __name__ == "__main__":
    main()

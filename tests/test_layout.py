"""The CPU weight layout (layout.py): a float32 base on a CPU stores its wide linears transposed; outputs, saving,
tied weights and `unload` are as with transformers' own layout."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from loramix import from_pretrained, load
from loramix.layout import restore_layout, transposed_weights

from conftest import save_model, tiny_llama


def _is_transposed(w: torch.Tensor) -> bool:
    return not w.is_contiguous() and w.t().is_contiguous()


def _weight(module: torch.nn.Module) -> torch.Tensor:
    return getattr(module, "base_layer", module).weight  # a mixed layer's base linear


def test_wide_linears_are_transposed_and_the_mixture_is_unchanged(llama_dir, llama_experts, input_ids):
    model = from_pretrained(llama_dir, llama_experts)
    block = model.model.model.layers[0]
    assert _is_transposed(_weight(block.mlp.up_proj))  # 32 -> 64: wide
    assert _is_transposed(_weight(block.mlp.gate_proj))
    assert _is_transposed(model.model.lm_head.weight)
    assert _weight(block.self_attn.q_proj).is_contiguous()  # square and narrow ones stay
    assert _weight(block.mlp.down_proj).is_contiguous()
    assert transposed_weights(model.model) == 2 * 2 + 1
    scalings = torch.rand(1, input_ids.shape[1], model.n_layers, model.n_experts)
    with torch.no_grad():
        mixed = model(input_ids, scalings=scalings).logits
        assert restore_layout(model.model) == 5 and transposed_weights(model.model) == 0
        plain = model(input_ids, scalings=scalings).logits
    torch.testing.assert_close(mixed, plain, rtol=1e-5, atol=1e-5)


def test_a_tied_base_saves_loads_and_unloads_as_transformers_lays_it_out(tmp_path, llama_experts, input_ids):
    base_dir = save_model(tiny_llama(tie_word_embeddings=True), tmp_path / "tied")
    model = from_pretrained(base_dir, llama_experts)
    head, embed = model.model.lm_head.weight, model.model.model.embed_tokens.weight
    assert head is embed and _is_transposed(head)
    with torch.no_grad():
        before = model(input_ids, scalings=0.5).logits
    saved = model.save(tmp_path / "ckpt", include_base=True)
    files = list((saved / "base").glob("*.safetensors"))
    tensors = {k: v for f in files for k, v in load_file(str(f)).items()}
    assert torch.equal(tensors["model.embed_tokens.weight"], embed.detach())  # one contiguous copy, the same values
    again = load(saved)
    assert again.model.lm_head.weight is again.model.model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids, scalings=0.5).logits, before)
    plain = model.unload()
    assert all(p.is_contiguous() for p in plain.parameters())
    assert plain.lm_head.weight is plain.model.embed_tokens.weight


def test_other_dtypes_keep_transformers_layout(llama_dir, llama_experts):
    model = from_pretrained(llama_dir, llama_experts, dtype=torch.bfloat16)
    assert transposed_weights(model.model) == 0

"""attention.py: the step attention runs SDPA itself when not compiled, and under dynamo the same attention as plain
operations (no SDPA call in the traced graph), with transformers' own outputs as the reference."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from loramix.attention import STEP_ATTENTION, use_step_attention


def tiny(attn: str = "sdpa") -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation=attn)
    return LlamaForCausalLM(config).eval()


def traced(fn):
    """fn compiled by dynamo with a backend that keeps each traced graph and runs it as traced (no inductor)."""
    graphs: list[torch.fx.GraphModule] = []

    def backend(gm, _inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    return torch.compile(fn, backend=backend, fullgraph=True), graphs


def sdpa_calls(graphs) -> int:
    return sum("scaled_dot_product_attention" in str(n.target) for g in graphs for n in g.graph.nodes)


@pytest.fixture
def batch():
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # a left-padded row
    return ids, mask


@torch.no_grad()
def test_eager_is_sdpa_and_compiled_is_plain_with_the_same_values(batch):
    ids, mask = batch
    model = tiny()
    ref = model(ids, attention_mask=mask).logits
    assert use_step_attention(model) and model.config._attn_implementation == STEP_ATTENTION
    assert torch.equal(model(ids, attention_mask=mask).logits, ref)  # eager: SDPA itself

    step, graphs = traced(lambda i, a: model(i, attention_mask=a).logits)
    out = step(ids, mask)
    assert sdpa_calls(graphs) == 0
    real = mask.bool()
    torch.testing.assert_close(out[real], ref[real], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_a_compiled_one_token_step_over_a_cache(batch):
    ids, mask = batch
    model = tiny()
    use_step_attention(model)
    cache = DynamicCache(config=model.config)
    model(ids[:, :-1], attention_mask=mask[:, :-1], past_key_values=cache)
    expected = tiny()(ids, attention_mask=mask).logits[:, -1]

    step, graphs = traced(lambda i, a, c: model(i, attention_mask=a, past_key_values=c).logits)
    out = step(ids[:, -1:], mask, cache)[:, -1]
    assert sdpa_calls(graphs) == 0
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_other_implementations_are_left_alone(tmp_path):
    model = tiny("eager")
    assert not use_step_attention(model) and model.config._attn_implementation == "eager"
    model = tiny()
    use_step_attention(model)
    model.save_pretrained(tmp_path)  # the name is not saved: the checkpoint loads anywhere
    assert STEP_ATTENTION not in (tmp_path / "config.json").read_text()

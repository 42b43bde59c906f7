"""The decode engine (decode.py) and generate(compile=...): compiled decoding equals the eager reference.

Most checks compile with the cheap "aot_eager" backend (dynamo's full-graph trace plus AOT functionalization, the
same graph inductor gets, without code generation); one test compiles with inductor itself. Step logits of the
compiled path are compared with the eager ones within 1e-4 (float32), tokens exactly.
"""

import logging

import pytest
import torch

import loramix
from loramix import ConfigError, GateConfig, MixConfig
from loramix.decode import Decoder, RowSpec, compile_options, compiled_step, decode_step
from loramix.text import encode_prompts

from conftest import char_tokenizer

TOL = dict(rtol=1e-4, atol=1e-4)


def _mix(base_dir, experts, **config):
    gate = config.pop("gate", GateConfig(depth=2, layerwise=True))
    mix = loramix.from_pretrained(base_dir, experts, MixConfig(gate=gate, **config))
    torch.manual_seed(0)
    with torch.no_grad():  # a sharp, input-dependent gate: routing changes from token to token
        for p in mix.gate.parameters():
            p.normal_(0.0, 1.0)
    return mix


def _batch():
    """Two prompts, left padded."""
    prompts = [[5, 17, 33, 9, 60, 42, 11], [7, 8, 44]]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield


@pytest.mark.parametrize("mode", ["granular", "prompt", "truncated", "fixed"])
def test_compiled_generation_equals_eager_in_every_mode(llama_dir, llama_experts, mode):
    mix = _mix(llama_dir, llama_experts, **({"scaling_layer": 1} if mode == "truncated" else {}))
    ids, mask = _batch()
    kwargs = dict(max_new_tokens=10, output_logits=True, return_scalings=True, eos_token_id=[])
    if mode == "fixed":
        kwargs["scalings"] = torch.rand(2, mix.n_layers, mix.n_experts)
    else:
        kwargs["mode"] = mode
    eager = mix.generate(ids, mask, **kwargs)
    compiled = mix.generate(ids, mask, compile="aot_eager", **kwargs)
    assert torch.equal(compiled.sequences, eager.sequences)
    torch.testing.assert_close(compiled.logits, eager.logits, **TOL)
    torch.testing.assert_close(compiled.scalings, eager.scalings, **TOL)
    assert compiled.mode == eager.mode and compiled.lengths == eager.lengths


def test_compiled_gpt2_equals_eager(gpt2_dir, gpt2_experts):
    mix = _mix(gpt2_dir, gpt2_experts)
    ids, mask = _batch()
    eager = mix.generate(ids, mask, max_new_tokens=8, output_logits=True, eos_token_id=[])
    compiled = mix.generate(ids, mask, max_new_tokens=8, output_logits=True, eos_token_id=[], compile="aot_eager")
    assert torch.equal(compiled.sequences, eager.sequences)
    torch.testing.assert_close(compiled.logits, eager.logits, **TOL)


def test_inductor_compiled_one_row_step_equals_eager(llama_dir, llama_experts):
    """One row: the step whose products become reductions (gemv.py) and whose attention is plain (attention.py);
    compiling puts the row-major layout back (layout.py)."""
    from loramix.attention import STEP_ATTENTION
    from loramix.gemv import RowReduction
    from loramix.layout import transposed_weights

    mix = _mix(llama_dir, llama_experts)
    assert isinstance(compile_options(mix, "inductor")["options"]["post_grad_custom_post_pass"], RowReduction)
    ids, mask = _batch()
    ids, mask = ids[1:], mask[1:]
    kwargs = dict(max_new_tokens=6, output_logits=True, eos_token_id=[])
    eager = mix.generate(ids, mask, **kwargs)
    compiled = mix.generate(ids, mask, **kwargs, compile=True)
    assert torch.equal(compiled.sequences, eager.sequences)
    torch.testing.assert_close(compiled.logits, eager.logits, **TOL)
    assert transposed_weights(mix) == 0 and mix.model.config._attn_implementation == STEP_ATTENTION
    assert torch.equal(mix.generate(ids, mask, **kwargs).sequences, eager.sequences)  # eager after it: unchanged


def test_inductor_compiled_step_equals_eager(llama_dir, llama_experts):
    from torch._dynamo.utils import counters

    mix = _mix(llama_dir, llama_experts)
    assert compile_options(mix, "inductor")["options"]["freezing"]  # a CPU: the weights frozen
    ids, mask = _batch()
    kwargs = dict(max_new_tokens=6, output_logits=True, eos_token_id=[])
    eager = mix.generate(ids, mask, **kwargs)
    compiled = mix.generate(ids, mask, **kwargs, compile=True)
    assert torch.equal(compiled.sequences, eager.sequences)
    torch.testing.assert_close(compiled.logits, eager.logits, **TOL)
    # other prompts through the same compiled step (a new decoder, new buffers): nothing of the first call's inputs
    # may have been frozen into it, and it is not compiled again
    graphs = counters["stats"]["unique_graphs"]
    ids, mask = ids.flip(0), mask.flip(0)
    ids[:, -1] = torch.tensor([3, 50])
    eager = mix.generate(ids, mask, **kwargs)
    compiled = mix.generate(ids, mask, **kwargs, compile=True)
    assert counters["stats"]["unique_graphs"] == graphs
    assert torch.equal(compiled.sequences, eager.sequences)
    torch.testing.assert_close(compiled.logits, eager.logits, **TOL)
    # another model of the same shapes (other gate weights), compiled anew: inductor's on-disk cache may serve the
    # first model's compiled code, but never its frozen weights
    torch._dynamo.reset()
    other = _mix(llama_dir, llama_experts)
    with torch.no_grad():
        for p in other.gate.parameters():
            p.mul_(-2.0)
    eager = other.generate(ids, mask, **kwargs)
    compiled = other.generate(ids, mask, **kwargs, compile=True)
    assert torch.equal(compiled.sequences, eager.sequences)
    torch.testing.assert_close(compiled.logits, eager.logits, **TOL)


def _joined(mix, mode, slots=64):
    """A decoder of two rows with the two prompts of `_batch` joined."""
    ids, mask = _batch()
    decoder = Decoder(mix, 2, slots, granular=mode not in ("prompt", "fixed"))
    decoder.place(ids.shape[1], 10)
    decoder.join([0, 1], ids, mask, [RowSpec(mode, max_new_tokens=10) for _ in range(2)])
    return decoder


@pytest.mark.parametrize("held", [False, True])
def test_decode_step_has_no_graph_break(llama_mix_truncated, held):
    mix = llama_mix_truncated
    decoder = _joined(mix, "prompt" if held else "truncated")
    decoder.buffers.held = held
    decoder.step()  # the first step sets the columns; the one explained is a plain step
    with torch.no_grad():
        explanation = torch._dynamo.explain(decode_step)(mix, decoder.buffers)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.fixture(scope="module")
def llama_mix_truncated(llama_dir, llama_experts):
    return _mix(llama_dir, llama_experts, scaling_layer=1)


def test_one_compile_per_batch_size(llama_dir, llama_experts):
    from torch._dynamo.testing import CompileCounter

    mix = _mix(llama_dir, llama_experts)
    counter = CompileCounter()
    ids, mask = _batch()
    kwargs = dict(max_new_tokens=6, eos_token_id=[], compile=counter)
    first = mix.generate(ids, mask, **kwargs)
    assert counter.frame_count == 1
    again = mix.generate(ids.flip(0), mask.flip(0), **kwargs)  # other prompts, same batch size and bucket
    assert counter.frame_count == 1, "a second call at the same batch size compiled again"
    assert torch.equal(first.sequences, again.sequences.flip(0))
    one = mix.generate(ids[1:], mask[1:], **kwargs)  # a new batch size: its own compiled step, never the old one
    assert counter.frame_count == 2
    assert torch.equal(one.sequences, mix.generate(ids[1:], mask[1:], max_new_tokens=6, eos_token_id=[]).sequences)


def test_compiled_step_buffers_are_updated_in_place(llama_dir, llama_experts):
    """The step writes the mask column and both passes' blocks in place: called directly it advances the same
    buffers (the slots each row writes this step, set by the decoder beforehand)."""
    mix = _mix(llama_dir, llama_experts)
    ids, _ = _batch()
    decoder = _joined(mix, "granular")
    b = decoder.buffers
    b.column.fill_(ids.shape[1])
    decoder.paged.column.fill_(ids.shape[1])
    decoder._slots_now(2)
    slots = decoder.paged.write[:, 0]
    assert slots.tolist() == [decoder.paged.slot(decoder.rows[i].table, decoder.rows[i].length - 1) for i in (0, 1)]
    for pools in (decoder.paged.mixed, decoder.paged.scaling):
        assert not pools[0][0][slots].any()
    with torch.no_grad():
        compiled_step(mix, 2, 64, False, "aot_eager")(mix, b)
    assert b.mask[:, ids.shape[1]].tolist() == [1, 1]
    for pools in (decoder.paged.mixed, decoder.paged.scaling):
        assert pools[0][0][slots].abs().sum(-1).all()  # every head of both rows' new keys written


def test_compiled_eos_and_sampling(llama_dir, llama_experts):
    mix = _mix(llama_dir, llama_experts)
    ids, mask = _batch()
    greedy = mix.generate(ids, mask, max_new_tokens=12, eos_token_id=[])
    eos = int(greedy.new_tokens[0, 2])
    eager = mix.generate(ids, mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    compiled = mix.generate(ids, mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=0, compile="aot_eager")
    assert torch.equal(compiled.sequences, eager.sequences)  # trimmed like eager, though stops are read every k steps
    assert compiled.finish_reasons == eager.finish_reasons and compiled.lengths == eager.lengths
    sample = dict(max_new_tokens=10, do_sample=True, temperature=1.3, eos_token_id=[], compile="aot_eager")
    a = mix.generate(ids, mask, seed=5, **sample).sequences
    assert torch.equal(a, mix.generate(ids, mask, seed=5, **sample).sequences)
    assert not torch.equal(a, mix.generate(ids, mask, seed=6, **sample).sequences)
    top1 = mix.generate(ids, mask, seed=5, **{**sample, "top_k": 1}).sequences
    assert torch.equal(top1, greedy.sequences[:, : top1.shape[1]])


def test_compile_where_it_cannot_apply(llama_dir, llama_experts, caplog):
    mix = _mix(llama_dir, llama_experts, gate=GateConfig(depth=2, layerwise=True, top_k=1))
    mix.sparse_top_k = "always"
    with caplog.at_level(logging.WARNING, logger="loramix.generate"):
        out = mix.generate(_batch()[0], _batch()[1], max_new_tokens=4, eos_token_id=[], compile="aot_eager")
    assert 'compile=True ignored, generating eagerly: sparse_top_k="always"' in caplog.text
    assert torch.equal(out.sequences, mix.generate(*_batch(), max_new_tokens=4, eos_token_id=[]).sequences)
    with pytest.raises(ConfigError, match="compile=True needs use_cache=True"):
        mix.generate(*_batch(), max_new_tokens=4, use_cache=False, compile=True)


def test_tokenizer_without_pad_or_eos_token(llama_dir, llama_experts):
    tokenizer = char_tokenizer()
    tokenizer.pad_token = None
    tokenizer.eos_token = None
    assert tokenizer.pad_token_id is None and tokenizer.eos_token_id is None
    ids, mask = encode_prompts(tokenizer, ["GRAVY", "AC"])
    assert tokenizer.pad_token is None, "encode_prompts changed the caller's tokenizer"
    assert mask.tolist()[1][:3] == [0, 0, 0] and ids.shape == (2, 6)
    mix = _mix(llama_dir, llama_experts)
    mix.tokenizer = tokenizer
    out = mix.generate(ids, mask, max_new_tokens=3)
    assert out.new_tokens.shape[0] == 2


def test_tokenizer_without_pad_keeps_its_settings():
    tokenizer = char_tokenizer()
    tokenizer.pad_token = None
    tokenizer.padding_side = "right"
    ids, _ = encode_prompts(tokenizer, ["GRAVY", "AC"])
    assert tokenizer.pad_token is None and tokenizer.padding_side == "right"
    assert ids[1, :3].tolist() == [tokenizer.eos_token_id] * 3  # padded with eos, on the left


def test_rows_move_left_when_the_first_ones_leave(llama_dir, llama_experts):
    """A short row joins beside a long prompt; once the long one leaves, the short one's columns move to the left
    edge (the steps attend to fewer columns) and its tokens stay those of generating it alone."""
    mix = _mix(llama_dir, llama_experts)
    torch.manual_seed(3)
    long, short = torch.randint(3, 90, (1, 70)), torch.tensor([[5, 17, 33]])
    decoder = Decoder(mix, 2, 256)
    decoder.place(70, 10)
    decoder.join([0], long, torch.ones_like(long), [RowSpec(max_new_tokens=10)])
    for _ in range(3):
        decoder.step()
    assert decoder.place(3, 40) == 73  # it fits where the columns are
    tokens = decoder.join([1], short, torch.ones_like(short), [RowSpec(max_new_tokens=40)]).tokens.tolist()
    decoder.leave(0)
    columns = []
    for _ in range(39):
        tokens.append(int(decoder.step().tokens[1]))
        columns.append(decoder.column)
    assert columns[0] == 4 and decoder.rows[1].start == 0  # moved 70 columns left at the first step after
    want = mix.generate(short, max_new_tokens=40, eos_token_id=[]).new_tokens[0].tolist()
    assert tokens == want

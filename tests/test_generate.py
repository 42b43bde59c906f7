"""Generation: two KV caches equal full recomputation, batching with left padding, modes, sampling, streaming."""

import re

import pytest
import torch

import loramix
from loramix import ConfigError, GateConfig, MixConfig

from conftest import load_base


def _mix(base_dir, experts, **config):
    gate = config.pop("gate", GateConfig(depth=2, layerwise=True))
    mix = loramix.from_pretrained(base_dir, experts, MixConfig(gate=gate, **config))
    torch.manual_seed(0)
    with torch.no_grad():  # a sharp, input-dependent gate so that routing really changes from token to token
        for p in mix.gate.parameters():
            p.normal_(0.0, 1.0)
    return mix


@pytest.fixture(scope="module")
def llama_mix(llama_dir, llama_experts):
    return _mix(llama_dir, llama_experts)


PROMPT = torch.tensor([[5, 17, 33, 9, 60, 42, 11]])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("mode", ["granular", "prompt", "truncated", "fixed"])
def test_cached_generation_equals_full_recompute(request, arch, mode):
    base_dir = request.getfixturevalue(f"{arch}_dir")
    experts = request.getfixturevalue(f"{arch}_experts")
    extra = {"scaling_layer": 1} if mode == "truncated" else {}
    mix = _mix(base_dir, experts, **extra)
    kwargs = dict(max_new_tokens=12, output_logits=True, return_scalings=True, eos_token_id=[])
    if mode == "fixed":
        kwargs["scalings"] = torch.rand(mix.n_layers, mix.n_experts)
    else:
        kwargs["mode"] = mode
    cached = mix.generate(PROMPT, **kwargs)
    full = mix.generate(PROMPT, use_cache=False, **kwargs)
    assert cached.new_tokens.shape == (1, 12)
    assert torch.equal(cached.sequences, full.sequences)
    torch.testing.assert_close(cached.logits, full.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached.scalings, full.scalings, rtol=1e-5, atol=1e-6)
    assert cached.mode == ("fixed" if mode == "fixed" else mode)


def test_two_caches_are_needed(llama_mix):
    """Sanity check of the test above: one cache shared by both passes gives other logits."""
    from transformers import DynamicCache

    ids = PROMPT
    shared = DynamicCache()
    with torch.no_grad():
        s = llama_mix.compute_scalings(ids, past_key_values=shared, use_cache=True)
        llama_mix(ids, scalings=s, past_key_values=loramix.LoraMixCache(shared, shared), use_cache=True)
        right = llama_mix.generate(ids, max_new_tokens=2, output_logits=True, eos_token_id=[]).logits[:, 1]
        nxt = right.argmax(-1, keepdim=True)
        s2 = llama_mix.compute_scalings(nxt, past_key_values=shared, use_cache=True)
        wrong = llama_mix(nxt, scalings=s2, past_key_values=loramix.LoraMixCache(shared, shared), use_cache=True)
    assert (wrong.logits[:, -1] - right).abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["granular", "prompt"])
def test_left_padded_batch_equals_one_by_one(llama_mix, mode):
    prompts = [[5, 17, 33, 9, 60, 42, 11], [7, 8], [44, 45, 46, 47]]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    batch = llama_mix.generate(
        ids, mask, max_new_tokens=10, mode=mode, return_scalings=True, output_logits=True, eos_token_id=[]
    )
    for row, prompt in enumerate(prompts):
        one = llama_mix.generate(
            torch.tensor([prompt]),
            max_new_tokens=10,
            mode=mode,
            return_scalings=True,
            output_logits=True,
            eos_token_id=[],
        )
        assert torch.equal(batch.new_tokens[row], one.new_tokens[0]), f"prompt {row}"
        torch.testing.assert_close(batch.logits[row], one.logits[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(batch.scalings[row], one.scalings[0], rtol=1e-4, atol=1e-5)


def test_truncated_with_all_blocks_equals_granular(llama_dir, llama_experts):
    full = _mix(llama_dir, llama_experts)
    truncated = _mix(llama_dir, llama_experts, scaling_layer=2)
    truncated.gate.load_state_dict(full.gate.state_dict())
    a = full.generate(PROMPT, max_new_tokens=8, return_scalings=True, eos_token_id=[])
    b = truncated.generate(PROMPT, max_new_tokens=8, mode="truncated", return_scalings=True, eos_token_id=[])
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.scalings, b.scalings)
    assert b.scaling_layer == 2


def test_truncated_scaling_pass_reads_block_k_then_the_final_norm(llama_dir, llama_experts):
    mix = _mix(llama_dir, llama_experts, scaling_layer=1)
    base = load_base(llama_dir)
    with torch.no_grad():
        hidden = base.model(PROMPT, output_hidden_states=True).hidden_states
        want = base.model.norm(hidden[1])  # after block 1, then the final norm
        got = mix.scaling_pass(PROMPT)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert len(mix.model.model.layers) == 2  # the block list is restored after the pass


def test_prompt_mode_holds_the_last_prompt_tokens_scalings(llama_mix):
    out = llama_mix.generate(PROMPT, max_new_tokens=6, mode="prompt", return_scalings=True, eos_token_id=[])
    with torch.no_grad():
        prompt_scalings = llama_mix.compute_scalings(PROMPT)
    assert torch.equal(out.scalings, prompt_scalings[:, -1:].expand_as(out.scalings))
    granular = llama_mix.generate(PROMPT, max_new_tokens=6, return_scalings=True, eos_token_id=[])
    assert not torch.equal(granular.scalings[:, 1:], out.scalings[:, 1:])  # granular ones do change


def test_greedy_equals_peft_xlora_generate(llama_dir, llama_experts_same_targets):
    from test_model import _peft_xlora

    peft_model = _peft_xlora(
        llama_dir, llama_experts_same_targets, xlora_depth=2, xlora_size=16, layerwise_scalings=True
    )
    mix = loramix.from_peft(peft_model)
    with torch.no_grad():
        want = peft_model.generate(
            input_ids=PROMPT, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    got = mix.generate(PROMPT, max_new_tokens=10, eos_token_id=[])
    assert torch.equal(got.sequences, want)


def test_experts_off_equals_transformers_generate_with_processors(llama_dir, llama_experts):
    mix = loramix.from_pretrained(llama_dir, llama_experts)
    base = load_base(llama_dir)
    zeros = torch.zeros(mix.n_layers, mix.n_experts)
    want = base.generate(
        PROMPT,
        max_new_tokens=15,
        do_sample=False,
        repetition_penalty=1.7,
        eos_token_id=None,
        pad_token_id=0,
        use_cache=True,
    )
    got = mix.generate(PROMPT, max_new_tokens=15, repetition_penalty=1.7, scalings=zeros, eos_token_id=[])
    assert torch.equal(got.sequences, want)


def test_sampling_is_reproducible_by_seed(llama_mix):
    kwargs = dict(max_new_tokens=12, do_sample=True, temperature=1.3, top_p=0.95, top_k=50, eos_token_id=[])
    a = llama_mix.generate(PROMPT, seed=7, **kwargs).sequences
    b = llama_mix.generate(PROMPT, seed=7, **kwargs).sequences
    c = llama_mix.generate(PROMPT, seed=8, **kwargs).sequences
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = llama_mix.generate(PROMPT, max_new_tokens=12, eos_token_id=[]).sequences
    assert torch.equal(
        llama_mix.generate(PROMPT, do_sample=True, top_k=1, seed=3, max_new_tokens=12, eos_token_id=[]).sequences,
        greedy,
    )
    assert torch.equal(
        llama_mix.generate(PROMPT, do_sample=True, temperature=0, max_new_tokens=12, eos_token_id=[]).sequences, greedy
    )


def test_eos_stops_a_row_and_pads_it(llama_mix):
    greedy = llama_mix.generate(PROMPT, max_new_tokens=8, eos_token_id=[]).new_tokens[0]
    eos = int(greedy[3])
    first = int((greedy == eos).nonzero()[0])
    ids = torch.cat([PROMPT, torch.tensor([[0, 0, 0] + PROMPT[0, :4].tolist()])], 0)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    out = llama_mix.generate(ids, mask, max_new_tokens=8, eos_token_id=eos, pad_token_id=0)
    assert out.finish_reasons[0] == "stop"
    assert int(out.new_tokens[0, first]) == eos and (out.new_tokens[0, first + 1 :] == 0).all()


def test_stop_strings_and_streaming(llama_dir, llama_experts, tokenizer):
    mix = _mix(llama_dir, llama_experts)
    mix.tokenizer = tokenizer
    ids = tokenizer("GRAVY of ACDE", return_tensors="pt").input_ids
    full = mix.generate(ids, max_new_tokens=20, eos_token_id=[])
    text = tokenizer.decode(full.new_tokens[0], skip_special_tokens=True)
    stop = text[5:7]
    stopped = mix.generate(ids, max_new_tokens=20, eos_token_id=[], stop_strings=[stop])
    stopped_text = tokenizer.decode(stopped.new_tokens[0], skip_special_tokens=True)
    assert stopped_text.endswith(stop) and text.startswith(stopped_text) and len(stopped_text) < len(text)
    assert stopped.finish_reasons == ["stop"] and full.finish_reasons == ["length"]
    assert stopped.texts == [text[: text.index(stop)]] and full.texts == [text]  # cut, as OpenAI does
    kept = mix.generate(ids, max_new_tokens=20, eos_token_id=[], stop_strings=stop, include_stop_str_in_output=True)
    assert kept.texts == [text[: text.index(stop) + len(stop)]] and torch.equal(kept.sequences, stopped.sequences)
    pieces = list(mix.stream("GRAVY of ACDE", max_new_tokens=20, eos_token_id=[]))
    assert len(pieces) > 1 and "".join(pieces) == text
    assert "".join(mix.stream("GRAVY of ACDE", max_new_tokens=20, eos_token_id=[], stop_strings=[stop])) == (
        stopped.texts[0]
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(max_new_tokens=-1), r"max_new_tokens=-1 must be an integer >= 0"),
        (dict(mode="turbo"), r"unknown mode 'turbo'; expected one of granular, prompt, truncated"),
        (dict(mode="truncated"), r"mode 'truncated' needs a gate trained on a truncated scaling pass"),
        (dict(scaling_layer=1), r"scaling_layer=1 but this gate was trained with scaling_layer=None"),
        (dict(top_p=0.0), r"top_p=0.0 must be in \(0, 1\]"),
        (dict(temperature=-1.0), r"temperature=-1.0 must be >= 0"),
        (dict(scalings=torch.zeros(3, 3)), r"scalings of shape \(3, 3\): expected \[12, 3\]"),
    ],
)
def test_bad_arguments_are_clear(llama_mix, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        llama_mix.generate(PROMPT, **kwargs)


def test_prompt_longer_than_the_context(llama_mix):
    with pytest.raises(ConfigError, match=r"the prompt has 129 tokens; the model's context is 128 tokens"):
        llama_mix.generate(torch.ones(1, 129, dtype=torch.long))
    out = llama_mix.generate(torch.ones(1, 125, dtype=torch.long), max_new_tokens=10, eos_token_id=[])
    assert out.new_tokens.shape[1] == 3  # clamped to the context


def test_zero_new_tokens_returns_the_prompt(llama_mix):
    out = llama_mix.generate(PROMPT, max_new_tokens=0)
    assert torch.equal(out.sequences, PROMPT) and out.new_tokens.shape == (1, 0)


@pytest.mark.parametrize("top_k", [1, 2])
def test_sparse_top_k_equals_dense(llama_dir, llama_experts, top_k):
    mix = _mix(llama_dir, llama_experts, gate=GateConfig(depth=2, layerwise=True, top_k=top_k))
    mix.sparse_top_k = "never"
    dense = mix.generate(PROMPT, max_new_tokens=10, output_logits=True, eos_token_id=[])
    mix.sparse_top_k = "always"
    with torch.no_grad():
        s = mix.compute_scalings(PROMPT[:, :1])
        prepared = mix.prepare_scalings(s)
    # per layer, exactly the experts that the token's top-k kept: the others' rows are never computed
    want = [tuple(int(e) for e in (s[0, 0, layer] != 0).nonzero().flatten()) for layer in range(mix.n_layers)]
    assert prepared.used_experts == want and all(len(u) == top_k for u in want)
    sparse = mix.generate(PROMPT, max_new_tokens=10, output_logits=True, eos_token_id=[])
    assert torch.equal(dense.sequences, sparse.sequences)
    torch.testing.assert_close(dense.logits, sparse.logits, rtol=1e-5, atol=1e-5)
    one = mix.generate(PROMPT[:, :1], max_new_tokens=4, return_scalings=True, eos_token_id=[])
    assert ((one.scalings > 0).sum(-1) == top_k).all()  # one token per decode step: top-k experts per layer


def test_sparse_top_k_auto_policy(llama_dir, llama_experts, tmp_path):
    from conftest import make_adapter

    mix = _mix(llama_dir, llama_experts, gate=GateConfig(top_k=1))
    with torch.no_grad():
        assert not mix.use_sparse_top_k(1)  # tiny experts: the dense stacked matmul is cheaper
        mix._mean_expert_elements = 2_000_000
        assert not mix.use_sparse_top_k(1)  # k=1 of 3 experts: not sparse enough (needs k <= N/4)
        mix.sparse_top_k = "always"
        assert mix.use_sparse_top_k(1) and mix.use_sparse_top_k(64)  # forced on
        mix.sparse_top_k = "never"
        assert not mix.use_sparse_top_k(1)  # forced off
    with pytest.raises(ConfigError, match="sparse_top_k=True must be one of 'auto', 'always', 'never'"):
        mix.sparse_top_k = True
    mix.save(tmp_path / "ckpt")  # the choice is part of the mixture's config, saved and restored
    assert loramix.load(tmp_path / "ckpt").sparse_top_k == "never"
    four = _mix(llama_dir, {**llama_experts, "extra": make_adapter(llama_dir, tmp_path / "extra", seed=4)},
                gate=GateConfig(top_k=1))
    four._mean_expert_elements = 2_000_000  # large experts, k=1 of 4: where gathering pays off
    with torch.no_grad():
        assert four.use_sparse_top_k(1) and four.use_sparse_top_k(2)  # decoding: one or two tokens per pass
        assert not four.use_sparse_top_k(3)  # a prompt: the dense matmul is cheaper
    assert not four.use_sparse_top_k(1)  # with gradients (training): always dense
    dense_only = _mix(llama_dir, llama_experts)
    with torch.no_grad():
        assert not dense_only.use_sparse_top_k(1)  # no top-k gate



def test_repetition_penalty_matches_transformers(llama_dir, llama_experts):
    """With every expert at scaling 0 the mixture is the base: its penalised greedy tokens are transformers' own."""
    mix = _mix(llama_dir, llama_experts)
    zeros = torch.zeros(mix.n_layers, mix.n_experts)
    for penalty in (1.0, 2.0):
        ours = mix.generate(PROMPT, scalings=zeros, max_new_tokens=12, repetition_penalty=penalty, eos_token_id=[])
        with torch.no_grad(), mix.experts_disabled():
            theirs = mix.model.generate(PROMPT, max_new_tokens=12, do_sample=False, repetition_penalty=penalty,
                                        eos_token_id=None, min_new_tokens=12)
        assert ours.sequences.tolist() == theirs.tolist(), penalty



@pytest.mark.parametrize("use_cache", [True, False])
def test_a_row_with_non_finite_values_ends_alone_with_its_reason(llama_dir, llama_experts, use_cache):
    mix = _mix(llama_dir, llama_experts)
    alone = mix.generate(PROMPT, max_new_tokens=4, eos_token_id=[], use_cache=use_cache)
    with torch.no_grad():  # token 90's embedding overflowed: NaN values for the row that reads it, and only it
        mix.model.get_input_embeddings().weight[90] = float("nan")
    ids = torch.cat([PROMPT, torch.tensor([[5, 17, 33, 90, 60, 42, 11]])])
    out = mix.generate(ids, max_new_tokens=4, eos_token_id=[], use_cache=use_cache)
    assert out.finish_reasons == ["length", "error"]
    assert out.errors[0] is None and re.match(r"non-finite logits or scalings at step 1 ", out.errors[1])
    assert out.lengths == [4, 0] and torch.equal(out.new_tokens[0], alone.new_tokens[0])
    with torch.no_grad():  # every row: the gate itself gives NaN scalings
        mix.gate.last.bias.fill_(float("nan"))
    out = mix.generate(ids, max_new_tokens=4, eos_token_id=[], use_cache=use_cache)
    assert out.finish_reasons == ["error", "error"] and out.lengths == [0, 0]

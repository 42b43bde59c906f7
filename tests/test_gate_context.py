"""Gates that read the tokens before (GateConfig.context = "ema" | "attention"): the formulas, causality, padding,
the three caches (eager KV caches, the compiled decode step's paged caches, the server's pool), save/load,
export refusals, training."""

import json

import pytest
import torch

import loramix
from loramix import ConfigError, GateConfig, MixConfig
from loramix.config import from_xlora
from loramix.serve.events import Done, Piece

from conftest import char_tokenizer

CONTEXTS = ("ema", "attention")


def context_mix(llama_dir, llama_experts, context, **mix_fields):
    """The tiny Llama with three experts and a random layer-wise gate reading `context` (weights drawn large, so
    scalings vary from token to token and depend clearly on the context)."""
    gate = GateConfig(layerwise=True, context=context, context_decay=0.7, context_width=8)
    mix = loramix.from_pretrained(
        llama_dir, llama_experts, MixConfig(gate=gate, **mix_fields), tokenizer=char_tokenizer()
    )
    torch.manual_seed(1)
    with torch.no_grad():
        for p in mix.gate.parameters():
            p.normal_()
    return mix


@pytest.fixture(scope="module", params=CONTEXTS)
def mix(request, llama_dir, llama_experts):
    return context_mix(llama_dir, llama_experts, request.param)


def ids_of(*shape, seed=0):
    return torch.randint(3, 96, shape, generator=torch.Generator().manual_seed(seed))


def test_config_fields_validation_and_defaults():
    assert GateConfig().context == "none"
    assert GateConfig.from_dict({"depth": 1}).context == "none"  # a config saved before the field existed
    with pytest.raises(ConfigError, match=r"gate.context='lstm' must be one of 'none', 'ema', 'attention'"):
        GateConfig(context="lstm")
    with pytest.raises(ConfigError, match=r"gate.context_decay=1.0 must be a number in \(0, 1\)"):
        GateConfig(context="ema", context_decay=1.0)
    with pytest.raises(ConfigError, match=r"gate.context_decay=0 must be"):
        GateConfig(context_decay=0)
    with pytest.raises(ConfigError, match=r"gate.context_width=0 must be an integer"):
        GateConfig(context="attention", context_width=0)
    with pytest.raises(ConfigError, match=r"gate.context='ema' feeds the MLP gate; gate.router='arrow'"):
        GateConfig(router="arrow", context="ema")
    assert from_xlora({}, width=None, bias=True).gate.context == "none"  # X-LoRA imports are the paper's gate


@pytest.mark.parametrize("context", ("none", *CONTEXTS))
def test_parameter_count_matches_the_module(llama_dir, llama_experts, context):
    mix = context_mix(llama_dir, llama_experts, context)
    count = mix.config.gate.parameter_count(mix.hidden_size, mix.n_layers, mix.n_experts)
    assert count == sum(p.numel() for p in mix.gate.parameters())
    names = {n.split(".")[0] for n, _ in mix.gate.named_parameters()}
    assert names == ({"last", "context"} if context == "attention" else {"last"})  # "none": the old tensor names


def test_an_untrained_attention_gate_is_the_plain_gate(llama_dir, llama_experts):
    plain = loramix.from_pretrained(llama_dir, llama_experts, MixConfig(gate=GateConfig(layerwise=True)))
    attention = loramix.from_pretrained(
        llama_dir, llama_experts, MixConfig(gate=GateConfig(layerwise=True, context="attention"))
    )
    attention.gate.last.load_state_dict(plain.gate.last.state_dict())
    ids = ids_of(2, 9)
    with torch.no_grad():
        torch.testing.assert_close(attention(ids).scalings, plain(ids).scalings)


def reference_context(mix, hidden, mask):
    """The context's output from its definition, one token at a time (docs/gates.md), [B, T, H]."""
    g = mix.config.gate
    B, T = hidden.shape[:2]
    out = torch.zeros_like(hidden)
    for b in range(B):
        real = [i for i in range(T) if mask[b, i]]
        for t in range(T):
            before = [i for i in real if i <= t]
            if g.context == "ema":
                if not before:
                    continue
                # the weights decay per real token: token i is (count of real tokens after it, up to t) steps back
                w = torch.tensor([g.context_decay ** sum(1 for j in before if j > i) for i in before])
                out[b, t] = (w[:, None] * hidden[b, before]).sum(0) / w.sum()
            else:
                ctx = mix.gate.context
                seen = sorted(set(before) | {t})
                q, k, v = ctx.query(hidden[b, t]), ctx.key(hidden[b, seen]), ctx.value(hidden[b, seen])
                q, k = q / q.norm(), k / k.norm(dim=-1, keepdim=True)  # unit queries and keys
                a = torch.softmax(k @ q * g.context_width**0.5, 0)
                out[b, t] = hidden[b, t] + ctx.out(a @ v)
    return out


def test_scalings_follow_the_definition_and_have_the_right_shape(mix):
    ids = ids_of(2, 9)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    with torch.no_grad():
        s = mix.compute_scalings(ids, mask)
        hidden = mix.scaling_pass(ids, mask)
        want = mix.gate.logits(reference_context(mix, hidden, mask)).softmax(-1)
        alone = mix.gate.logits(hidden).softmax(-1)  # the same MLP on each token's own hidden state
    assert s.shape == (2, 9, mix.n_layers, mix.n_experts)
    torch.testing.assert_close(s[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s[1, 3:], want[1, 3:], rtol=1e-5, atol=1e-5)
    if mix.config.gate.context == "ema":  # the first token's average is itself
        torch.testing.assert_close(s[0, 0], alone[0, 0], rtol=1e-5, atol=1e-5)
    assert (s[0, 1:] - alone[0, 1:]).abs().max() > 1e-2  # the context changes the routing of later tokens


def test_a_tokens_scalings_never_depend_on_later_tokens(mix):
    ids = ids_of(2, 12)
    changed = ids.clone()
    changed[:, 7:] = ids_of(2, 5, seed=1)
    with torch.no_grad():
        full = mix(ids).scalings
        other = mix(changed).scalings
        prefix = mix(ids[:, :7]).scalings
    torch.testing.assert_close(other[:, :7], full[:, :7], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(prefix, full[:, :7], rtol=1e-5, atol=1e-5)  # other shapes: float rounding
    assert (other[:, 7:] - full[:, 7:]).abs().max() > 1e-3
    early = ids.clone()
    early[:, 2] = (ids[:, 2] + 1 - 3) % 93 + 3  # a change before: every later token's routing sees it
    with torch.no_grad():
        moved = mix(early).scalings
    assert (moved[:, 3:] - full[:, 3:]).abs().amax((-1, -2, -3)).min() > 1e-6


def test_left_padding_equals_no_padding(mix):
    ids = ids_of(1, 8)
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], 1)
    batch = torch.cat([padded, ids_of(1, 12, seed=2)])
    mask = torch.ones_like(batch)
    mask[0, :4] = 0
    with torch.no_grad():
        alone = mix(ids)
        together = mix(batch, attention_mask=mask)
    torch.testing.assert_close(together.scalings[0, 4:], alone.scalings[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(together.logits[0, 4:], alone.logits[0], rtol=1e-5, atol=1e-5)
    gen = dict(max_new_tokens=6, return_scalings=True, eos_token_id=[])
    one = mix.generate(ids, **gen)
    two = mix.generate(batch, mask, **gen)
    assert torch.equal(two.new_tokens[0], one.new_tokens[0])
    torch.testing.assert_close(two.scalings[0], one.scalings[0], rtol=1e-5, atol=1e-5)


def test_step_by_step_kv_cache_equals_the_full_forward(mix):
    ids = ids_of(2, 10)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    with torch.no_grad():
        full = mix(ids, attention_mask=mask)
        cache = mix.new_cache()
        assert cache.gate is not None
        parts = []
        for start, end in ((0, 4), *((t, t + 1) for t in range(4, 10))):  # a 4-token prefill, then one at a time
            out = mix(ids[:, start:end], attention_mask=mask[:, :end], past_key_values=cache,
                      position_ids=(mask.cumsum(-1) - 1).clamp_min(0)[:, start:end])
            parts.append(out)
    scalings = torch.cat([p.scalings for p in parts], 1)
    logits = torch.cat([p.logits for p in parts], 1)
    torch.testing.assert_close(scalings[0, 2:], full.scalings[0, 2:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scalings[1], full.scalings[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[1], full.logits[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[0, 2:], full.logits[0, 2:], rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="a cached scaling pass needs the gate's cache too"):
        mix(ids, past_key_values=loramix.LoraMixCache(cache.scaling, cache.mixed), use_cache=True)


def test_cached_generation_equals_recomputing_the_prefix(mix):
    ids = ids_of(2, 7)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    gen = dict(max_new_tokens=8, return_scalings=True, output_logits=True, eos_token_id=[])
    cached = mix.generate(ids, mask, **gen)
    again = mix.generate(ids, mask, use_cache=False, **gen)
    assert torch.equal(cached.sequences, again.sequences)
    # 1e-4 as the MLP gate's generation tests: over 15 positions the KV cache's float rounding (~1e-6 in the hidden
    # states) is amplified by the large random gate (the step-by-step test above holds to 1e-5)
    torch.testing.assert_close(cached.scalings, again.scalings, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cached.logits, again.logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ("granular", "prompt"))
def test_compiled_decode_step_equals_eager(mix, mode):
    ids = ids_of(2, 7, seed=3)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    gen = dict(max_new_tokens=9, return_scalings=True, output_logits=True, eos_token_id=[], mode=mode)
    eager = mix.generate(ids, mask, **gen)
    engine = mix.generate(ids, mask, compile="aot_eager", **gen)
    assert torch.equal(engine.sequences, eager.sequences)
    torch.testing.assert_close(engine.scalings, eager.scalings, rtol=1e-4, atol=1e-4)  # static vs dynamic caches
    torch.testing.assert_close(engine.logits, eager.logits, rtol=1e-4, atol=1e-4)
    if mode == "prompt":  # every generated token mixes with the last prompt token's scalings
        assert torch.equal(eager.scalings[:, 1:], eager.scalings[:, :1].expand_as(eager.scalings[:, 1:]))


@pytest.mark.parametrize("context", CONTEXTS)
def test_truncated_scaling_pass(llama_dir, llama_experts, context):
    mix = context_mix(llama_dir, llama_experts, context, scaling_layer=1)
    ids = ids_of(1, 6, seed=4)
    gen = dict(max_new_tokens=6, return_scalings=True, eos_token_id=[], mode="truncated")
    cached = mix.generate(ids, **gen)
    again = mix.generate(ids, use_cache=False, **gen)
    engine = mix.generate(ids, compile="aot_eager", **gen)
    assert torch.equal(cached.sequences, again.sequences) and torch.equal(engine.sequences, again.sequences)
    torch.testing.assert_close(cached.scalings, again.scalings, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(engine.scalings, again.scalings, rtol=1e-4, atol=1e-4)


def test_save_load_keeps_the_variant_and_weights(mix, tmp_path):
    path = mix.save(tmp_path / "ckpt")
    gate = json.loads((path / "loramix_config.json").read_text())["mix_config"]["gate"]
    assert (gate["context"], gate["context_decay"], gate["context_width"]) == (mix.config.gate.context, 0.7, 8)
    loaded = loramix.load(path)
    assert loaded.config.gate == mix.config.gate
    ids = ids_of(1, 9)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).scalings, mix(ids).scalings)
        torch.testing.assert_close(loaded(ids).logits, mix(ids).logits)


def test_an_old_checkpoint_loads_as_the_paper_gate(llama_dir, llama_experts, tmp_path):
    mix = context_mix(llama_dir, llama_experts, "none")
    path = mix.save(tmp_path / "old")
    config = json.loads((path / "loramix_config.json").read_text())
    for key in ("context", "context_decay", "context_width"):
        del config["mix_config"]["gate"][key]  # as written before these fields existed
    (path / "loramix_config.json").write_text(json.dumps(config))
    loaded = loramix.load(path)
    assert loaded.config.gate.context == "none" and loaded.gate.context is None
    ids = ids_of(1, 9)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, mix(ids).logits)


def test_exports_refuse_context_gates(mix, tmp_path):
    from loramix.interop.mistralrs import export_mistralrs
    from loramix.interop.peft import to_peft

    context = mix.config.gate.context
    with pytest.raises(loramix.LoramixError, match=rf"gate.context='{context}': mistral.rs's X-LoRA runs the per-tok"):
        export_mistralrs(mix, tmp_path / "m", base_model_id="tiny")
    with pytest.raises(ConfigError, match=rf"gate.context='{context}': PEFT's XLoraModel runs the per-token MLP gate"):
        to_peft(mix)
    assert not (tmp_path / "m").exists()


def run_engine(mix, prompts, *, max_batch, compile=False):
    """Texts of greedy requests sent together to one engine (they share its slots, in order)."""
    from loramix.serve.engine import Engine, Job

    results: dict[int, dict] = {}
    engine = Engine(mix, max_batch=max_batch, compile=compile, cache_len=128)
    try:
        jobs = [
            Job(ids=mix.tokenizer(p).input_ids, max_tokens=n, mode=mode, return_scalings="token",
                emit=lambda event, i=i: results.__setitem__(i, event) if not isinstance(event, Piece) else None)
            for i, (p, n, mode) in enumerate(prompts)
        ]
        engine.submit_group(jobs)
        import time

        deadline = time.time() + 300
        while len(results) < len(jobs) and time.time() < deadline:
            time.sleep(0.01)
    finally:
        engine.close()
    assert all(isinstance(results[i], Done) for i in range(len(prompts))), results
    return [results[i] for i in range(len(prompts))], engine


@pytest.mark.parametrize("compile", (False, "aot_eager"))
def test_engine_slots_give_the_same_text_as_alone(mix, compile):
    # two slots; the first request ends early and a third, with a longer prompt, takes its slot (the engine moves the
    # running row along the cache columns), a prompt-mode request takes the other slot after the second ends
    prompts = [("AB", 3, "granular"), ("KKLLMMN", 14, "granular"), ("GRAVY of ACDKWWQ", 8, "granular"),
               ("12+3=", 5, "prompt")]
    together, engine = run_engine(mix, prompts, max_batch=2, compile=compile)
    assert engine.batches < len(prompts) or engine.steps > 0
    for (prompt, n, mode), got in zip(prompts, together):
        ids = torch.tensor([mix.tokenizer(prompt).input_ids])
        want = mix.generate(ids, max_new_tokens=n, mode=mode, return_scalings=True, eos_token_id=[])
        text = mix.tokenizer.decode(want.new_tokens[0].tolist(), skip_special_tokens=True)
        assert got.text == text, (prompt, got.text, text)
        torch.testing.assert_close(torch.tensor(got.scalings), want.scalings[0, : len(got.scalings)],
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("context", CONTEXTS)
def test_train_gate_moves_the_context_parameters(llama_dir, llama_experts, context, tmp_path):
    from loramix.train import TrainConfig, train_gate

    mix = context_mix(llama_dir, llama_experts, context)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"ACDK {i} WWQ{i * 7}"}) + "\n" for i in range(16)))
    seen = {}
    for name, p in mix.gate.named_parameters():
        p.register_hook(lambda g, name=name: seen.__setitem__(name, float(g.abs().sum())))
    before = {n: p.detach().clone() for n, p in mix.gate.named_parameters()}
    train_gate(mix, data, tmp_path / "ckpt", train=TrainConfig(learning_rate=1e-2, max_steps=3, batch_size=4,
                                                                 seed=0, progress=False))
    assert set(seen) == set(before) and all(v > 0 for v in seen.values())
    assert all(not torch.equal(p, before[n]) for n, p in mix.gate.named_parameters())
    if context == "attention":
        assert {n for n in seen if n.startswith("context.")} == {f"context.{m}.weight" for m in
                                                                   ("query", "key", "value", "out")}
    loaded = loramix.load(tmp_path / "ckpt")
    assert loaded.config.gate.context == context


def test_context_lr_scale_slows_the_attention_only(llama_dir, llama_experts, tmp_path):
    """GateObjective.context_lr_scale: the attention's weights step at that fraction of the MLP's rate (one Adam step
    moves every weight with a gradient by about the rate), and a gate without attention weights refuses it."""
    from loramix.train import GateObjective, TrainConfig, train_gate

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"ACDK {i} WWQ{i * 7}"}) + "\n" for i in range(8)))
    train = TrainConfig(learning_rate=1e-2, max_steps=1, batch_size=8, schedule="constant", seed=0, progress=False)
    mix = context_mix(llama_dir, llama_experts, "attention")
    before = {n: p.detach().clone() for n, p in mix.gate.named_parameters()}
    train_gate(mix, data, tmp_path / "ckpt", train=train, objective=GateObjective(context_lr_scale=0.01))
    step = {n: float((p.detach() - before[n]).abs().max()) for n, p in mix.gate.named_parameters()}
    assert step["last.weight"] == pytest.approx(1e-2, rel=0.05)
    for name in ("query", "key", "value", "out"):
        assert step[f"context.{name}.weight"] == pytest.approx(1e-4, rel=0.05), name
    with pytest.raises(ConfigError, match="context_lr_scale applies to a gate with weights of its own context"):
        train_gate(context_mix(llama_dir, llama_experts, "ema"), data, tmp_path / "other", train=train,
                   objective=GateObjective(context_lr_scale=0.1))

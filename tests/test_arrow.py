"""The Arrow router (GateConfig(router="arrow")): prototypes, parity with PEFT's `arrow`, causality, caches, save/load,
exports, the `loramix mix` command."""

import json

import pytest
import torch

import loramix
from loramix import ConfigError, GateConfig, MixConfig
from loramix.gate import arrow_prototypes

from conftest import load_base, make_adapter, save_model, tiny_llama

ARROW = MixConfig(gate=GateConfig(router="arrow", top_k=2, temperature=0.7))


def test_prototypes_are_the_top_right_singular_vectors():
    torch.manual_seed(0)
    a = torch.randn(3 + 2 + 4, 16)  # experts of ranks 3, 2, 4 stacked
    b = torch.randn(12, 9)
    protos = arrow_prototypes(a, b, [3, 2, 4], [1.0, 0.5, 0.0])
    assert protos.shape == (3, 16)
    for e, (start, r) in enumerate([(0, 3), (3, 2)]):
        _, _, vh = torch.linalg.svd(b[:, start : start + r].double() @ a[start : start + r].double())
        assert abs(float(vh[0] @ protos[e].double())) == pytest.approx(1.0, abs=1e-6)  # the same up to sign
    assert not protos[2].any()  # scale 0: the expert does not adapt this layer, it is never chosen


@pytest.fixture(scope="module")
def one_block(tmp_path_factory):
    """A one-block Llama with three experts on q, k, v: every adapted layer reads the same input in the scaling pass
    and in the mixed pass, so loramix's two-pass Arrow equals PEFT's one-pass Arrow exactly."""
    root = tmp_path_factory.mktemp("arrow")
    base = save_model(tiny_llama(num_hidden_layers=1), root / "base")
    experts = {
        f"e{i}": make_adapter(base, root / f"e{i}", targets=["q_proj", "k_proj", "v_proj"], r=4, alpha=8 + 4 * i,
                              seed=30 + i)
        for i in range(3)
    }
    return base, experts


def test_arrow_equals_peft_arrow(one_block, monkeypatch):
    from peft import ArrowConfig, create_arrow_model
    from peft.tuners.lora.arrow import ArrowLoraLinearLayer

    # PEFT finds each prototype by 15 steps of power iteration from a random vector, which has not always converged
    # (here one expert's prototype is 0.70 aligned with the exact one); with enough steps it is the exact vector
    power = ArrowLoraLinearLayer.top_right_singular_vec_from_BA
    monkeypatch.setattr(ArrowLoraLinearLayer, "top_right_singular_vec_from_BA",
                        lambda self, a, b, iters=15, eps=1e-8: power(self, a, b, iters=3000, eps=eps))
    base, experts = one_block
    peft_model = create_arrow_model(
        load_base(base), [str(p) for p in experts.values()], ArrowConfig(top_k=2, router_temperature=0.7, rng_seed=0)
    )
    mix = loramix.from_pretrained(str(base), experts, ARROW)
    ids = torch.randint(3, 96, (2, 9))
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
        got = mix(ids)
        plain = load_base(base)(input_ids=ids).logits
    torch.testing.assert_close(got.logits, want, rtol=1e-5, atol=1e-5)
    assert (plain - want).abs().max() > 0.1  # the experts do change the output
    s = got.scalings  # [B, T, L, N]: top-2 of 3 per (token, layer), summing to 1
    assert ((s > 0).sum(-1) == 2).all() and torch.allclose(s.sum(-1), torch.ones(()))


def test_causal_cached_and_saved(llama_dir, llama_experts, tmp_path):
    mix = loramix.from_pretrained(llama_dir, llama_experts, ARROW)
    # its weights are the prototypes, one [N, d_in] per adapted layer, exactly arrow_prototypes of the experts
    assert len(mix.gate.prototypes) == mix.n_layers
    for layer, proto in zip(mix.mixed_layers(), mix.gate.prototypes):
        assert proto.shape == (mix.n_experts, layer.in_features)
        assert torch.equal(proto, arrow_prototypes(layer.lora_A, layer.lora_B, layer.ranks, layer.scales))
    ids = torch.randint(3, 96, (1, 12))
    with torch.no_grad():
        full = mix(ids).scalings
        prefix = mix(ids[:, :7]).scalings
    torch.testing.assert_close(prefix, full[:, :7])  # a token's routing never depends on later tokens
    assert not torch.allclose(full[0, 0], full[0, 5])  # and it does depend on the token

    out = mix.generate(ids, max_new_tokens=8, return_scalings=True, output_logits=True, eos_token_id=[])
    seq = out.sequences
    with torch.no_grad():  # without any cache: one full forward over the whole sequence
        again = mix(seq[:, :-1])
    torch.testing.assert_close(out.logits[0], again.logits[0, ids.shape[1] - 1 :], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.scalings[0], again.scalings[0, ids.shape[1] - 1 :], rtol=1e-4, atol=1e-4)
    # the decode engine's step (static caches, traced by torch.compile) fills the probes as the eager path does
    engine = mix.generate(ids, max_new_tokens=8, return_scalings=True, eos_token_id=[], compile="aot_eager")
    assert torch.equal(engine.sequences, seq)
    torch.testing.assert_close(engine.scalings, out.scalings, rtol=1e-4, atol=1e-4)

    path = mix.save(tmp_path / "ckpt")
    assert json.loads((path / "loramix_config.json").read_text())["mix_config"]["gate"]["router"] == "arrow"
    loaded = loramix.load(path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, mix(ids).logits)


def test_arrow_refusals(llama_dir, llama_experts, tmp_path):
    with pytest.raises(ConfigError, match=r"gate.router=.moe. must be one of .mlp., .arrow."):
        GateConfig(router="moe")
    with pytest.raises(ConfigError, match="truncated scaling pass"):
        loramix.from_pretrained(llama_dir, llama_experts, MixConfig(gate=GateConfig(router="arrow"), scaling_layer=1))
    mix = loramix.from_pretrained(llama_dir, llama_experts, ARROW)
    from loramix.interop.mistralrs import export_mistralrs
    from loramix.interop.peft import to_peft

    with pytest.raises(loramix.LoramixError, match=r"mistral.rs.s X-LoRA runs the MLP gate only"):
        export_mistralrs(mix, tmp_path / "m", base_model_id="tiny")
    with pytest.raises(ConfigError, match="PEFT's XLoraModel runs the MLP gate only"):
        to_peft(mix)
    assert not (tmp_path / "m").exists()


def test_mix_command_builds_an_arrow_checkpoint(llama_dir, llama_experts, tmp_path):
    from typer.testing import CliRunner

    from loramix.cli import app

    args = ["mix", "--base", str(llama_dir), "--out", str(tmp_path / "ckpt"), "--top-k", "2", "--temperature", "0.7"]
    for name, path in llama_experts.items():
        args += ["--expert", f"{name}={path}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    loaded = loramix.load(tmp_path / "ckpt")
    direct = loramix.from_pretrained(llama_dir, llama_experts, ARROW)
    ids = torch.randint(3, 96, (1, 6))
    assert loaded.config.gate.router == "arrow" and loaded.expert_names == list(llama_experts)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, direct(ids).logits)
    refused = CliRunner().invoke(app, [*args[:4], str(tmp_path / "other"), "--router", "mlp", *args[5:]])
    assert refused.exit_code == 2 and "an MLP gate must be trained" in refused.output


def probe_reference(mix, ids):
    """The Arrow scalings computed outside loramix's probes: every mixed layer's input in the scaling pass (the base
    model, captured by hooks), scored against the router's prototypes with autograd, top-k, softmax."""
    inputs = {}
    hooks = [layer.register_forward_hook(lambda m, args, out, i=i: inputs.__setitem__(i, args[0]))
             for i, layer in enumerate(mix.mixed_layers())]
    try:
        with torch.no_grad():
            mix.scaling_pass(ids)
    finally:
        for h in hooks:
            h.remove()
    cfg = mix.config.gate
    probes = torch.stack([torch.nn.functional.linear(inputs[i], p).abs() for i, p in enumerate(mix.gate.prototypes)],
                         -2)  # [B, T, L, N]
    values, index = (probes / cfg.temperature).topk(cfg.top_k, -1)
    return torch.zeros_like(probes).scatter(-1, index, values.softmax(-1))


def test_arrow_router_trains_from_arrow(llama_dir, llama_experts, tmp_path):
    """Arrow as the initialisation of a trained router: the probes carry gradients to the prototypes (equal to those
    of a reference computed from the layers' inputs), train_gate moves them, and the checkpoint keeps them."""
    from loramix.train import TrainConfig, train_gate

    from conftest import char_tokenizer

    mix = loramix.from_pretrained(llama_dir, llama_experts, ARROW, tokenizer=char_tokenizer())
    ids = torch.randint(3, 96, (2, 7), generator=torch.Generator().manual_seed(3))
    weights = torch.randn(2, 7, mix.n_layers, mix.n_experts, generator=torch.Generator().manual_seed(4))
    got = mix.compute_scalings(ids)
    (got * weights).sum().backward()
    grads = [p.grad.clone() for p in mix.gate.prototypes]
    mix.gate.zero_grad()
    want = probe_reference(mix, ids)
    (want * weights).sum().backward()
    torch.testing.assert_close(got, want)
    assert any(float(g.abs().sum()) > 0 for g in grads)
    for g, p in zip(grads, mix.gate.prototypes):
        torch.testing.assert_close(g, p.grad)
    mix.gate.zero_grad()
    with torch.no_grad():  # inference keeps no graph
        assert not mix.compute_scalings(ids).requires_grad

    before = [p.detach().clone() for p in mix.gate.prototypes]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"ACDK {i} WWQ{i * 7}"}) + "\n" for i in range(16)))
    train_gate(mix, data, tmp_path / "ckpt", train=TrainConfig(learning_rate=1e-2, max_steps=3, batch_size=4, seed=0,
                                                                 progress=False))
    moved = [not torch.equal(p, b) for p, b in zip(mix.gate.prototypes, before)]
    assert all(moved)
    loaded = loramix.load(tmp_path / "ckpt")
    assert loaded.config.gate.router == "arrow"
    for p, q in zip(loaded.gate.prototypes, mix.gate.prototypes):
        assert torch.equal(p, q)  # the trained prototypes, not Arrow's recomputed from the experts
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).scalings, mix(ids).scalings)


def test_an_arrow_checkpoint_without_prototypes_recomputes_them(llama_dir, llama_experts, tmp_path):
    from safetensors.torch import save_file

    mix = loramix.from_pretrained(llama_dir, llama_experts, ARROW)
    path = mix.save(tmp_path / "ckpt")
    save_file({}, str(path / "gate.safetensors"), {"format": "pt"})  # as `loramix mix` wrote Arrow checkpoints before
    loaded = loramix.load(path)
    for p, q in zip(loaded.gate.prototypes, mix.gate.prototypes):
        assert torch.equal(p, q)

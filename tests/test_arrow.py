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
    assert sum(p.numel() for p in mix.gate.parameters()) == 0  # nothing to train
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

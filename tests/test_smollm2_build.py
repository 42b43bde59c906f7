"""The SmolLM2 build's pieces that need no SmolLM2: the joint stage's records (`joint_mixture`), and `ship`, how a
build is laid out as the demo ships it, on a tiny Llama: with a joint stage, the shipped gate and trained experts are
the joint checkpoint's, the frozen experts the files they trained alone as."""

import json
import shutil

import torch
from safetensors.torch import load_file

import loramix
from loramix.demo.smollm2 import SmolBuildConfig, joint_args, joint_mixture, ship
from loramix.demo.smollm2_run import mixture_from_parts

from conftest import load_base


def _build_dir(tmp_path, llama_dir, experts, *, joint: bool, frozen=("b",)):
    build = tmp_path / "build"
    names = dict(zip(("a", "b", "c"), experts))
    for name, path in names.items():
        shutil.copytree(path, build / "experts" / name)
    torch.manual_seed(0)
    mix = loramix.from_pretrained(llama_dir, {n: build / "experts" / n for n in names},
                                  loramix.MixConfig(gate=loramix.GateConfig(depth=2, layerwise=True)))
    mix.save(build / "checkpoint")
    torch.manual_seed(1)
    for p in mix.gate.parameters():
        torch.nn.init.normal_(p, std=0.5)
    mix.save(build / "checkpoint-truncated")
    if joint:  # the gate and experts a and c moved, b kept
        torch.manual_seed(2)
        for p in mix.gate.parameters():
            torch.nn.init.normal_(p, std=0.5)
        with torch.no_grad():
            tensors = mix.expert_tensors()
            for e in (0, 2):
                for t in tensors[e].values():
                    t.add_(0.1 * torch.randn_like(t))
        mix.save(build / "checkpoint-joint")
    (build / "chat_references.jsonl").write_text("")
    (build / "build.json").write_text(json.dumps({"config": {"joint_frozen": list(frozen)}, "stages": {}}))
    return build, mix


def test_ship_lays_out_the_joint_stage(tmp_path, llama_dir, llama_experts_same_targets, tokenizer, input_ids):
    build, joint = _build_dir(tmp_path, llama_dir, llama_experts_same_targets, joint=True)
    weights = ship(build, tmp_path / "weights")
    # the frozen expert: the very files it trained alone as; the trained ones: the joint checkpoint's
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (weights / "experts" / "b" / name).read_bytes() == (build / "experts" / "b" / name).read_bytes()
    assert (weights / "gate" / "gate.safetensors").read_bytes() == (
        build / "checkpoint-joint" / "gate.safetensors").read_bytes()
    assert (weights / "gate-truncated" / "gate.safetensors").read_bytes() == (
        build / "checkpoint-truncated" / "gate.safetensors").read_bytes()
    alone = load_file(build / "experts" / "a" / "adapter_model.safetensors")
    shipped = load_file(weights / "experts" / "a" / "adapter_model.safetensors")
    assert set(alone) == set(shipped) and any(not torch.equal(alone[k], shipped[k]) for k in alone)
    assert not [p for p in weights.rglob("*") if p.name.startswith(".")]  # no ownership markers in a package
    # the shipped parts make the joint checkpoint's mixture
    parts = mixture_from_parts(load_base(llama_dir), tokenizer, weights / "gate", weights / "experts")
    with torch.no_grad():
        torch.testing.assert_close(parts(input_ids).logits, joint.eval()(input_ids).logits)


def test_a_joint_stage_with_every_expert_frozen_ships_its_gate(tmp_path, llama_dir, llama_experts_same_targets):
    build, _ = _build_dir(tmp_path, llama_dir, llama_experts_same_targets, joint=True, frozen=("a", "b", "c"))
    weights = ship(build, tmp_path / "weights")
    assert (weights / "gate" / "gate.safetensors").read_bytes() == (
        build / "checkpoint-joint" / "gate.safetensors").read_bytes()
    for expert in ("a", "b", "c"):  # copied as they trained alone
        assert (weights / "experts" / expert / "adapter_model.safetensors").read_bytes() == (
            build / "experts" / expert / "adapter_model.safetensors").read_bytes()


def test_ship_without_a_joint_stage_copies_the_experts(tmp_path, llama_dir, llama_experts_same_targets):
    build, _ = _build_dir(tmp_path, llama_dir, llama_experts_same_targets, joint=False)
    weights = ship(build, tmp_path / "weights")
    for expert in ("a", "b", "c"):
        assert (weights / "experts" / expert / "adapter_model.safetensors").read_bytes() == (
            build / "experts" / expert / "adapter_model.safetensors").read_bytes()
    assert (weights / "gate" / "gate.safetensors").read_bytes() == (
        build / "checkpoint" / "gate.safetensors").read_bytes()


class _ChatTemplate:
    """A tokenizer's chat template, as much of it as ChatWorld uses."""

    chat_template = "user/assistant"

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        return f"<user>{messages[0]['content']}<assistant>"


def test_joint_mixture_puts_a_quarter_of_forward_on_new_peptides():
    """The joint stage's records: the five domains in equal shares, a quarter of the forward records on new peptides
    (none of the validation, test or held-out sets), the rest the training split's."""
    import re

    from loramix.demo.chat_world import CHAT_DOMAINS, ChatWorld, instructions
    from loramix.demo.heldout import HELDOUT_SIZES, heldout_peptides

    world = ChatWorld(_ChatTemplate(), {i: "an answer." for i in instructions()})
    cfg = SmolBuildConfig(joint_steps=10, gate_batch=8)
    records = joint_mixture(world, cfg)
    per_domain = 10 * 8 // len(CHAT_DOMAINS) + 1
    assert sorted(r["domain"] for r in records) == sorted(d for d in CHAT_DOMAINS for _ in range(per_domain))
    peptides = [re.findall(r"[A-Z]{5,}", r["prompt"])[-1] for r in records if r["domain"] == "forward"]  # after "GRAVY"
    new = [p for p in peptides if p not in set(world.world.splits["train"])]
    assert len(new) == round(per_domain * cfg.joint_new_share)
    unseen = set(world.world.splits["val"]) | set(world.world.splits["test"])
    unseen |= {p for p, _ in heldout_peptides(sum(HELDOUT_SIZES.values()))}
    assert not set(new) & unseen
    assert joint_mixture(world, cfg) == records  # seeded


def test_joint_args_are_a_train_gate_command_line(tmp_path):
    """The joint stage's command parses as `loramix train-gate` does it, with the build's options; the shared
    template prefix goes to the named expert only when the config names one."""
    from loramix.cli import load_command

    command = load_command("train-gate")
    cfg = SmolBuildConfig(joint_steps=7, joint_frozen=("inverse", "qa"), joint_shared_prefix_expert="chat")
    args = joint_args(cfg, tmp_path / "ckpt", tmp_path / "joint.jsonl", tmp_path / "out")
    assert args[0] == "train-gate"
    params = command.make_context("train-gate", args[1:]).params
    assert params["init"] == tmp_path / "ckpt" and params["out"] == tmp_path / "out"
    assert params["mix__trainable_experts"] is True
    assert params["objective__frozen_experts"] == ["inverse", "qa"]
    assert params["objective__expert_lr_scale"] == cfg.joint_expert_lr_scale
    assert params["objective__shared_prefix_expert"] == "chat"
    assert params["train__max_steps"] == 7
    unset = joint_args(SmolBuildConfig(joint_steps=7, joint_shared_prefix_expert=None), *[tmp_path] * 3)
    assert command.make_context("train-gate", unset[1:]).params["objective__shared_prefix_expert"] is None

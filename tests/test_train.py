"""Training: experts with PEFT, the gate, exact resume after SIGKILL, two processes, and a gate that learns to route."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import loramix
from loramix.train import TrainConfig, train_expert, train_gate

from conftest import char_tokenizer, tiny_llama

LETTERS = "abcdefghijklmnopqrstuvwxyz"
DIGITS = "0123456789"


def _run(alphabet: str, step: int, rng: random.Random, length: int, noise: float = 0.3) -> str:
    """Each character is the previous one moved by `step` along the alphabet, except that with probability `noise` it
    is any character of the alphabet: every next character keeps some entropy that no model can remove."""
    i = rng.randrange(len(alphabet))
    out = []
    for _ in range(length):
        out.append(alphabet[i % len(alphabet)])
        i = rng.randrange(len(alphabet)) if rng.random() < noise else i + step
    return "".join(out)


def domain_records(n: int, seed: int) -> list[dict]:
    """Two distinguishable synthetic domains: letters going up, digits going down (with noise). The prompt (3
    characters) tells the domain; the loss is on the completion."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        letters = i % 2 == 0
        run = _run(LETTERS, 1, rng, 16) if letters else _run(DIGITS, -1, rng, 16)
        out.append({"prompt": run[:3], "completion": run[3:], "domain": "letters" if letters else "digits"})
    return out


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def pretrain(model, tokenizer, steps: int = 300, seed: int = 0):
    """A few hundred steps of full training on random strings of one alphabet each (no sequential structure): the
    base learns the characters, not the tasks, so that the experts carry the skills (as in the demo)."""
    from loramix.data import collate, tokenize_records

    rng = random.Random(seed)
    generic = [{"text": "".join(rng.choice(LETTERS if i % 2 else DIGITS) for _ in range(16))} for i in range(2000)]
    examples = tokenize_records(generic, tokenizer, 64)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        chunk = examples[step * 16 % 2000 : step * 16 % 2000 + 16]
        batch = collate([{"input_ids": e.input_ids, "labels": e.labels, "domain": -1} for e in chunk], 0)
        model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
        ).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny Llama pretrained on generic strings, a character tokenizer, and data files for the two domains.

    The tokenizer adds no BOS: a BOS token is the same for every domain, so no gate can route it, and its keys and
    values (which every later token attends to) would then differ from those of the expert alone.
    """
    root = tmp_path_factory.mktemp("train")
    tokenizer = char_tokenizer(add_bos=False)
    pretrain(tiny_llama(seed=5, initializer_range=0.5), tokenizer).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    records = domain_records(4000, seed=0)
    _jsonl(root / "letters.jsonl", [r for r in records if r["domain"] == "letters"])
    _jsonl(root / "digits.jsonl", [r for r in records if r["domain"] == "digits"])
    _jsonl(root / "mixed.jsonl", records)
    _jsonl(root / "heldout.jsonl", domain_records(40, seed=1))
    return root


@pytest.fixture(scope="module")
def experts(world):
    config = TrainConfig(learning_rate=1e-2, max_steps=250, batch_size=16, warmup_steps=10, seed=0, progress=False)
    out = {}
    for name in ("letters", "digits"):
        metrics = train_expert(
            world / "base",
            world / f"{name}.jsonl",
            world / f"expert-{name}",
            rank=8,
            alpha=16,
            dropout=0.0,
            train=config,
        )
        out[name] = (world / f"expert-{name}", metrics)
    return out


def test_train_expert_writes_a_peft_adapter_and_the_loss_falls(world, experts):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    path, _ = experts["letters"]
    lines = [json.loads(x) for x in (world / "expert-letters.run" / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in lines if "loss" in x]
    assert losses[-1] < 0.7 * losses[0]
    assert {"tokens_per_s", "lr", "steps_per_s"} <= set(lines[0])
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(world / "base"), str(path))
    assert peft_model.peft_config["default"].r == 8
    assert (path / "adapter_model.safetensors").is_file() and not list(world.glob(".expert-letters.tmp-*"))


def test_train_gate_only_changes_the_gate(world, experts, tmp_path):
    config = TrainConfig(learning_rate=1e-2, max_steps=10, batch_size=8, seed=0, progress=False, save_every=5)
    mix = loramix.from_pretrained(world / "base", {n: p for n, (p, _) in experts.items()})
    before = {n: p.detach().clone() for n, p in mix.named_parameters()}
    umask = os.umask(0o022)
    try:
        metrics = train_gate(
            mix, world / "mixed.jsonl", tmp_path / "ckpt", train=config, eval_data=world / "heldout.jsonl"
        )
    finally:
        os.umask(umask)
    saved = [p for p in (tmp_path / "ckpt.run" / "checkpoints").rglob("*") if p.is_file()]
    assert any(p.name == "trainable.safetensors" for p in saved)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in saved if p.stat().st_mode & 0o777 != 0o644} == {}
    assert {"eval_loss", "eval_loss/letters", "eval_loss/digits"} <= set(metrics)
    changed = {n for n, p in mix.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n, _ in mix.gate.named_parameters(prefix="gate")}
    again = loramix.load(tmp_path / "ckpt")
    assert torch.equal(again.gate.last.weight, mix.gate.last.weight)
    assert again.tokenizer is not None


def test_gate_learns_to_route(world, experts, tmp_path):
    """On held-out prompts of each domain the right expert dominates >= 90% of tokens, and the mixture's loss is
    within 5% of that domain's expert alone."""
    config = TrainConfig(learning_rate=5e-2, max_steps=400, batch_size=16, warmup_steps=10, seed=0, progress=False)
    gate = loramix.MixConfig(gate=loramix.GateConfig(depth=2, layerwise=True))
    train_gate(
        None,
        world / "mixed.jsonl",
        tmp_path / "routed",
        base=world / "base",
        experts={n: p for n, (p, _) in experts.items()},
        config=gate,
        train=config,
    )
    mix = loramix.load(tmp_path / "routed")
    tok = mix.tokenizer
    held = domain_records(60, seed=7)
    names = mix.expert_names
    for domain in ("letters", "digits"):
        records = [r for r in held if r["domain"] == domain]
        ids = tok([r["prompt"] + r["completion"] for r in records], return_tensors="pt").input_ids  # no padding
        right = names.index(domain)
        with torch.no_grad():
            out = mix(ids)
            share = (out.scalings.mean(2).argmax(-1) == right).float().mean()
            alone = torch.zeros(*ids.shape, mix.n_layers, mix.n_experts)
            alone[..., right] = 1.0
            expert = mix(ids, scalings=alone)
        start = len(records[0]["prompt"]) - 1  # the loss of the completion tokens, as in training
        mixture_loss = _completion_loss(out.logits, ids, start)
        expert_loss = _completion_loss(expert.logits, ids, start)
        assert share >= 0.9, f"{domain}: right expert dominant on {share:.0%} of tokens"
        assert mixture_loss <= 1.05 * expert_loss, f"{domain}: mixture {mixture_loss:.4f} vs expert {expert_loss:.4f}"
        base_loss = _completion_loss(mix.base_forward(ids).logits, ids, start)
        assert expert_loss < 0.8 * base_loss  # the experts really carry the skill


def _completion_loss(logits: torch.Tensor, ids: torch.Tensor, start: int) -> float:
    predicted = logits[:, start:-1].transpose(1, 2)
    return float(torch.nn.functional.cross_entropy(predicted, ids[:, start + 1 :]))


def _gate_cmd(world, experts, out: Path, steps: int, save_every: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "loramix",
        "train-gate",
        "--data",
        str(world / "mixed.jsonl"),
        "--out",
        str(out),
        "--base",
        str(world / "base"),
        "--expert",
        f"letters={experts['letters'][0]}",
        "--expert",
        f"digits={experts['digits'][0]}",
        "--depth",
        "2",
        "--layerwise",
        "--gate-dropout",
        "0.3",
        "--max-steps",
        str(steps),
        "--batch-size",
        "4",
        "--lr",
        "5e-3",
        "--warmup-steps",
        "5",
        "--save-every",
        str(save_every),
        "--log-every",
        "5",
        "--seed",
        "3",
    ]


def test_resume_after_sigkill_matches_an_uninterrupted_run(world, experts, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    steps = 400
    subprocess.run(
        _gate_cmd(world, experts, tmp_path / "straight", steps, 1000),
        check=True,
        env=env,
        capture_output=True,
        timeout=600,
    )
    cmd = _gate_cmd(world, experts, tmp_path / "killed", steps, 20)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = tmp_path / "killed.run" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not (checkpoints / "step-60").exists():
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed").exists(), "the run finished before it could be killed"
    done = sorted(int(p.name.split("-")[1]) for p in checkpoints.glob("step-*"))
    assert done and max(done) < steps
    # a half-written checkpoint (no trainer_state.json) from a later step must be ignored
    fake = checkpoints / f"step-{steps - 1}"
    shutil.copytree(checkpoints / f"step-{max(done)}", fake)
    (fake / "trainer_state.json").unlink()
    (checkpoints / f".step-{steps - 2}.tmp").mkdir()
    subprocess.run([*cmd, "--resume"], check=True, env=env, capture_output=True, timeout=600)
    a = load_file(str(tmp_path / "straight" / "gate.safetensors"))
    b = load_file(str(tmp_path / "killed" / "gate.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6)
    log = [json.loads(x) for x in (tmp_path / "killed.run" / "metrics.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == steps
    logged = [r["step"] for r in log if "loss" in r]
    assert logged == sorted(set(logged)), "the resumed run logged steps twice"


def test_two_processes_with_accelerate_launch(world, experts, tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "2",
        "--cpu",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "loramix",
        "train-gate",
        "--data",
        str(world / "mixed.jsonl"),
        "--out",
        str(tmp_path / "ddp"),
        "--base",
        str(world / "base"),
        "--expert",
        f"letters={experts['letters'][0]}",
        "--expert",
        f"digits={experts['digits'][0]}",
        "--layerwise",
        "--max-steps",
        "30",
        "--batch-size",
        "8",
        "--lr",
        "2e-2",
        "--log-every",
        "5",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    log = [json.loads(x) for x in (tmp_path / "ddp.run" / "metrics.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 30 and log[-1]["loss"] < log[0]["loss"]
    hparams = json.loads((tmp_path / "ddp.run" / "hparams.json").read_text())
    assert hparams["train"]["batch_size"] == 8
    mix = loramix.load(tmp_path / "ddp")
    assert mix.expert_names == ["letters", "digits"]


def test_gate_objective_terms_have_their_documented_values(llama_dir, llama_experts):
    from loramix.train.gate import GateObjective, example_mean_loss, gate_loss

    mix = loramix.from_pretrained(llama_dir, llama_experts, loramix.MixConfig(gate=loramix.GateConfig(layerwise=True)))
    p = torch.tensor([0.7, 0.2, 0.1])
    with torch.no_grad():  # every token, every layer: scalings p
        mix.gate.last.weight.zero_()
        mix.gate.last.bias.copy_(p.log().repeat(mix.n_layers))
    ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 0, 0]])
    labels = torch.tensor([[-100, -100, 7, 8, 9], [-100, 11, 12, -100, -100]])
    batch = {"input_ids": ids, "attention_mask": (labels != -100).long() | torch.tensor([[1] * 5, [1, 1, 1, 0, 0]]),
             "labels": labels, "domain": torch.tensor([0, 1])}
    logits = mix(ids, attention_mask=batch["attention_mask"]).logits
    per_token = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none",
                                                  ignore_index=-100)
    want_example = (per_token[0, 1:4].mean() + per_token[1, 0:2].mean()) / 2
    torch.testing.assert_close(example_mean_loss(logits, labels), want_example)
    objective = GateObjective(loss_weighting="example", entropy_weight=0.5, balance_weight=0.25, route_weight=2.0)
    loss, parts = gate_loss(mix, batch, objective, expert_of_domain=torch.tensor([0, 2]))
    entropy = float(-(p * p.log()).sum())
    balance = 3 * float((p**2).sum())
    route = float(-(torch.log(p[0]) * 5 + torch.log(p[2]) * 3) / 8)  # domain 0 -> expert 0, domain 1 -> expert 2
    assert parts["entropy"] == pytest.approx(entropy, rel=1e-5)
    assert parts["balance"] == pytest.approx(balance, rel=1e-5)
    assert parts["route"] == pytest.approx(route, rel=1e-5)
    assert float(loss) == pytest.approx(float(want_example) + 0.5 * entropy + 0.25 * balance + 2.0 * route, rel=1e-5)
    # only the positions that predict a trained token: 3 in record 0 (positions 1-3), 2 in record 1 (0-1)
    _, parts = gate_loss(mix, batch, GateObjective(route_weight=1.0, route_tokens="answer"), torch.tensor([0, 2]))
    assert parts["route"] == pytest.approx(float(-(torch.log(p[0]) * 3 + torch.log(p[2]) * 2) / 5), rel=1e-5)
    # the first 2 tokens of every row (a shared prefix) to expert 1, the rest to their domain's
    _, parts = gate_loss(mix, batch, GateObjective(route_weight=1.0, shared_prefix_expert="math"), torch.tensor([0, 2]),
                         shared_prefix=(2, 1))
    want = -(torch.log(p[1]) * 4 + torch.log(p[0]) * 3 + torch.log(p[2]) * 1) / 8
    assert parts["route"] == pytest.approx(float(want), rel=1e-5)
    with pytest.raises(loramix.ConfigError, match="shared_prefix_expert='math' routes prompt tokens"):
        GateObjective(shared_prefix_expert="math")  # no routing term
    with pytest.raises(loramix.ConfigError, match="shared_prefix_expert='math' routes prompt tokens"):
        GateObjective(route_weight=1.0, route_tokens="answer", shared_prefix_expert="math")
    with pytest.raises(loramix.ConfigError, match="route_tokens='prompt'"):
        GateObjective(route_tokens="prompt")
    with pytest.raises(loramix.ConfigError, match="loss_weighting='tokens'"):
        GateObjective(loss_weighting="tokens")


def test_the_shared_prefix_is_routed_to_the_named_expert(world, experts, tmp_path):
    """GateObjective.shared_prefix_expert: the tokens every record starts with (as a chat template's system turn) go
    to the named expert, the others to their record's domain; the prefix is found in the records, and refused when
    there is none or the expert is unknown."""
    from loramix.train.gate import GateObjective

    records = [{**r, "prompt": "## " + r["prompt"]} for r in domain_records(64, seed=5)]
    data = _jsonl(tmp_path / "prefixed.jsonl", records)
    paths = {n: p for n, (p, _) in experts.items()}
    gate = loramix.MixConfig(gate=loramix.GateConfig(depth=2, layerwise=True))
    train = TrainConfig(learning_rate=5e-2, max_steps=120, batch_size=16, warmup_steps=5, seed=0, progress=False)
    letters = [r for r in records if r["domain"] == "letters"][:8]
    shares = {}
    for name, prefix_expert in (("with", "digits"), ("without", None)):
        objective = GateObjective(route_weight=10.0, shared_prefix_expert=prefix_expert)
        train_gate(None, data, tmp_path / name, base=world / "base", experts=paths, config=gate, train=train,
                   objective=objective)
        mix = loramix.load(tmp_path / name)
        ids = mix.tokenizer([r["prompt"] + r["completion"] for r in letters], return_tensors="pt").input_ids
        with torch.no_grad():
            s = mix(ids).scalings.mean(2)  # [B, T, N], layer-averaged
        shares[name] = s[:, :3, mix.expert_names.index("digits")].mean()
        assert (s[:, 4:].argmax(-1) == mix.expert_names.index("letters")).float().mean() > 0.8  # the rest: its domain
    assert json.loads((tmp_path / "with.run" / "hparams.json").read_text())["shared_prefix_tokens"] == 3
    print(shares)
    assert shares["with"] > 0.75 and shares["with"] > shares["without"] + 0.2
    for bad, message in (("nobody", "shared_prefix_expert: no expert 'nobody'"), ("digits", "share no first token")):
        with pytest.raises(loramix.ConfigError, match=message):
            train_gate(None, data if bad == "nobody" else world / "mixed.jsonl", tmp_path / "bad", base=world / "base",
                       experts=paths, config=gate, train=train,
                       objective=GateObjective(route_weight=1.0, shared_prefix_expert=bad))
    assert not (tmp_path / "bad").exists()


def test_trainable_experts_with_a_lower_rate_an_anchor_and_the_best_evaluation(world, experts, tmp_path):
    """The safety options of --trainable-experts: a lower learning rate moves the experts less, the anchor term has
    its documented value, and keep_best ends with exactly the weights of the best evaluation."""
    from loramix.train.gate import ExpertAnchor, GateObjective, gate_loss

    expert_dirs = {n: p for n, (p, _) in experts.items()}
    mixed, heldout = world / "mixed.jsonl", world / "heldout.jsonl"
    config = loramix.MixConfig(trainable_experts=True)

    def run(name, objective, steps=4, keep_best=False):
        train = TrainConfig(learning_rate=0.05, max_steps=steps, batch_size=8, seed=0, progress=False,
                            schedule="constant", eval_every=2 if keep_best else None, keep_best=keep_best)
        torch.manual_seed(0)  # the same starting gate in every run
        mix = loramix.from_pretrained(world / "base", expert_dirs, config)
        start = {n: p.detach().clone() for n, p in mix.named_parameters() if n.endswith((".lora_A", ".lora_B"))}
        metrics = train_gate(mix, mixed, tmp_path / name, train=train, eval_data=heldout if keep_best else None,
                             objective=objective)
        moved = sum(float((p - start[n]).norm() ** 2) for n, p in mix.named_parameters() if n in start)
        return mix, metrics, moved

    _, _, full = run("full", GateObjective())
    _, _, slow = run("slow", GateObjective(expert_lr_scale=0.01))
    assert 0 < slow < 0.01 * full  # Adam: the distance moved scales with the rate
    logged = [json.loads(x) for x in (tmp_path / "slow.run" / "metrics.jsonl").read_text().splitlines()]
    assert {r["lr"] for r in logged if "lr" in r} == {0.05}  # the gate's (configured) rate, not the experts'

    # frozen_experts: their rows of lora_A and columns of lora_B stay exactly as loaded, the others move
    names = list(expert_dirs)
    kept, _, _ = run("kept", GateObjective(frozen_experts=(names[0],)))
    fresh = loramix.from_pretrained(world / "base", expert_dirs, config)
    for layer, start in zip(kept.mixed_layers(), fresh.mixed_layers()):
        r = layer.ranks[0]
        assert torch.equal(layer.lora_A[:r], start.lora_A[:r]) and torch.equal(layer.lora_B[:, :r], start.lora_B[:, :r])
    assert any(not torch.equal(a.lora_A[a.ranks[0]:], b.lora_A[b.ranks[0]:])
               for a, b in zip(kept.mixed_layers(), fresh.mixed_layers()))
    with pytest.raises(loramix.ConfigError, match="frozen_experts: no expert 'nope'"):
        run("unknown", GateObjective(frozen_experts=("nope",)))

    mix = loramix.from_pretrained(world / "base", expert_dirs, config)
    layer = next(mix.mixed_layers())
    anchor = ExpertAnchor({"a": layer.lora_A})
    with torch.no_grad():
        layer.lora_A.mul_(2)  # W = 2 W0: ||W - W0||^2 / ||W0||^2 = 1
    batch = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
             "labels": torch.tensor([[-100, 6, 7]]), "domain": torch.tensor([0])}
    _, parts = gate_loss(mix, batch, GateObjective(expert_anchor_weight=2.0), anchor=anchor)
    assert parts["anchor"] == pytest.approx(1.0, rel=1e-5)

    best_mix, metrics, _ = run("best", GateObjective(), steps=10, keep_best=True)
    log = [json.loads(x) for x in (tmp_path / "best.run" / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["eval_loss"] for r in log if "eval_loss" in r}
    best_step = min(evals, key=evals.get)
    assert best_step < 10 and metrics["best_step"] == best_step  # at this rate the held-out loss rises again
    replay, _, _ = run("replay", GateObjective(), steps=best_step)  # a constant rate: the same trajectory, cut there
    for (name, p), (_, q) in zip(best_mix.named_parameters(), replay.named_parameters()):
        assert torch.equal(p, q), name
    saved = loramix.load(tmp_path / "best")
    assert torch.equal(saved.gate.last.weight, replay.gate.last.weight)
    with pytest.raises(loramix.ConfigError, match="keep_best needs evaluation data"):
        train_gate(loramix.from_pretrained(world / "base", expert_dirs), mixed, tmp_path / "none",
                   train=TrainConfig(max_steps=2, keep_best=True, progress=False))

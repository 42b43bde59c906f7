"""Training speed: gate training (base + 4 experts frozen, scaling pass without gradients) against plain LoRA training
of one expert (PEFT, rank 8, the same target modules), on the ~25M-parameter benchmark Llama, with loramix's Trainer
(Accelerate, AdamW, clipping) on random token sequences. Interleaved rounds, torch threads fixed.

    python benchmarks/train.py --threads 2 --steps 20 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import TARGETS, build_base, build_experts, machine, workdir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per timed run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    import loramix
    from loramix.data import Example, TokenizedDataset
    from loramix.train import TrainConfig, Trainer
    from loramix.train.common import batch_logits
    from loramix.train.gate import gate_loss

    work = workdir()
    base_dir = build_base(work)
    experts = build_experts(base_dir, work, n=4, rank=8, targets=TARGETS)
    g = torch.Generator().manual_seed(0)
    n_examples = args.batch * args.steps
    data = TokenizedDataset(
        [Example(ids, ids) for ids in torch.randint(0, 32000, (n_examples, args.tokens), generator=g).tolist()]
    )

    mix = loramix.from_pretrained(
        base_dir,
        {f"e{i}": p for i, p in enumerate(experts)},
        loramix.MixConfig(gate=loramix.GateConfig(layerwise=True)),
    )
    lora = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir),
        LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0),
    )

    def lora_loss(model, batch):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        return out.loss, {}

    def run(kind: str) -> float:
        model = mix if kind == "gate" else lora
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        config = TrainConfig(
            learning_rate=1e-4, max_steps=args.steps, batch_size=args.batch, progress=False, log_every=args.steps
        )
        trainer = Trainer(
            model,
            trainable,
            data,
            None,
            config,
            work / f"run-{kind}",
            loss_fn=gate_loss if kind == "gate" else lora_loss,
            logits_fn=batch_logits,
            pad_token_id=0,
        )
        start = time.perf_counter()
        trainer.train()
        return time.perf_counter() - start

    run("gate")
    run("lora")  # warm-up
    times: dict[str, list[float]] = {"gate": [], "lora": []}
    for r in range(args.rounds):
        for kind in ["gate", "lora"] if r % 2 == 0 else ["lora", "gate"]:
            times[kind].append(run(kind))
    tokens = args.batch * args.tokens * args.steps
    n_gate = sum(p.numel() for p in mix.gate.parameters())
    n_lora = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    print(
        f"machine: {machine()}; threads {args.threads}; batch {args.batch} x {args.tokens} tokens; "
        f"{args.steps} steps per run, median of {args.rounds} interleaved rounds"
    )
    print("| training | trainable parameters | steps/s | tokens/s | time ratio to LoRA |")
    print("|---|---|---|---|---|")
    lora_median = statistics.median(times["lora"])
    for kind, label, n in (
        ("lora", "plain LoRA, one expert (PEFT)", n_lora),
        ("gate", "loramix gate, 4 experts", n_gate),
    ):
        median = statistics.median(times[kind])
        print(f"| {label} | {n:,} | {args.steps / median:.2f} | {tokens / median:.0f} | {median / lora_median:.2f}x |")


if __name__ == "__main__":
    main()

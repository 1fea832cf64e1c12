#!/usr/bin/env python
"""Time one training step (forward, backward, AdamW update) of each LRA model side by side, in one process, on
random inputs of a task's shape: the first measurement of the equal-step comparison (docs/lra.md), from which the
input length and batch of each task's runs are chosen.

    python scripts/lra/step_times.py --task image --max_length 1024 --batch_size 32 --threads 1

The models are those `run_lra.py --config CONFIG` trains (the Transformer, Luna-l with [CLS], Luna-l with P-mean,
the learned-kernel attention);
Retrieval times the pair classifier (two documents per example). Every model gets the same inputs; the median of
`--steps` steps after `--warmup` untimed ones is reported, and a line per model is appended to `--output_file`.
"""

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from lra_models import LISTOPS_SYMBOLS, LRAArguments, build_model
from transformers import HfArgumentParser

MODELS = {"transformer": dict(model="transformer"), "luna": dict(model="luna"),
          "luna-pmean": dict(model="luna", classifier_pooling="packed_mean"),
          "learned-kernel": dict(model="learned-kernel")}
NUM_LABELS = {"listops": 10, "text": 20, "retrieval": 2, "image": 10, "pathfinder": 2}


@dataclass
class StepTimeArguments:
    task: str = field(metadata={"help": "listops, text, retrieval, image or pathfinder."})
    max_length: int = field(metadata={"help": "Tokens per input (per document for retrieval)."})
    batch_size: int = field(metadata={"help": "Examples per step."})
    config: str = field(default="small", metadata={"help": "run_lra.py's --config whose model sizes are timed."})
    models: list[str] = field(default_factory=lambda: list(MODELS), metadata={"help": f"Any of {list(MODELS)}."})
    projected_length: int = 16
    steps: int = field(default=5, metadata={"help": "Timed steps per model (the median is reported)."})
    warmup: int = field(default=1, metadata={"help": "Untimed steps first."})
    threads: int = field(default=1, metadata={"help": "torch CPU threads."})
    output_file: str = "outputs/lra/step_times.jsonl"

    def __post_init__(self):
        if self.task not in NUM_LABELS:
            raise ValueError(f"--task must be one of {list(NUM_LABELS)}, got {self.task!r}.")
        unknown = set(self.models) - set(MODELS)
        if unknown:
            raise ValueError(f"Unknown --models {sorted(unknown)}: choose from {list(MODELS)}.")
        if min(self.max_length, self.batch_size, self.steps, self.projected_length) < 1 or self.warmup < 0:
            raise ValueError("--max_length, --batch_size, --steps and --projected_length must be positive, "
                             "--warmup non-negative.")


def random_batch(task: str, batch_size: int, length: int, vocab_size: int, generator: torch.Generator) -> dict:
    """Full-length inputs (the worst case a step meets) and random labels."""
    ids = lambda: torch.randint(4, vocab_size, (batch_size, length), generator=generator)  # noqa: E731
    batch = {"input_ids": ids(), "attention_mask": torch.ones(batch_size, length, dtype=torch.long),
             "labels": torch.randint(0, NUM_LABELS[task], (batch_size,), generator=generator)}
    if task == "retrieval":
        batch.update(input_ids2=ids(), attention_mask2=torch.ones(batch_size, length, dtype=torch.long))
    return batch


def time_model(args: StepTimeArguments, name: str, batch: dict, vocab_size: int) -> dict:
    run = LRAArguments(task=args.task, data_dir=".", config=args.config, projected_length=args.projected_length,
                       max_length=args.max_length, batch_size=args.batch_size, **MODELS[name])
    task = run.task_config()
    model = build_model(run, task, vocab_size, NUM_LABELS[args.task]).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=task.learning_rate)
    times = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    return {"task": args.task, "model": run.run_name, "config": args.config, "max_length": args.max_length,
            "batch_size": args.batch_size, "threads": args.threads, "step_seconds": round(statistics.median(times), 3),
            "parameters": sum(p.numel() for p in model.parameters())}


def main(argv: list[str] | None = None) -> list[dict]:
    (args,) = HfArgumentParser(StepTimeArguments).parse_args_into_dataclasses(args=argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    vocab_size = 4 + (len(LISTOPS_SYMBOLS) if args.task == "listops" else 256)
    # A <CLS> token is one more position than the data's length; time the longer of the two inputs for all.
    batch = random_batch(args.task, args.batch_size, args.max_length + 1, vocab_size,
                         torch.Generator().manual_seed(0))
    rows = [time_model(args, name, batch, vocab_size) for name in args.models]
    baseline = next((row["step_seconds"] for row in rows if row["model"] == "transformer"), None)
    print(f"| {args.task} | length | batch | model | step (s) | Transformer / model |\n|---|---:|---:|---|---:|---:|")
    for row in rows:
        ratio = f"{baseline / row['step_seconds']:.1f}x" if baseline else "—"
        print(f"| {args.task} | {args.max_length} | {args.batch_size} | {row['model']} | {row['step_seconds']} | "
              f"{ratio} |")
    Path(args.output_file).parent.mkdir(parents=True, exist_ok=True)
    with open(args.output_file, "a") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    return rows


if __name__ == "__main__":
    main()

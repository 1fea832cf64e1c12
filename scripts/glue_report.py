#!/usr/bin/env python
"""The GLUE table from the records of scripts/glue_runs.sh (benchmarks/results/glue/<task>.jsonl):

    python scripts/glue_report.py --output benchmarks/results/glue/table.md

One row per task and model: the metric per seed, the mean and sample standard deviation over the seeds, the mean
as a share of the teacher's (MiniLM's) mean on the same task and seeds, and the attention transfer's steps. QQP
reports accuracy and F1 (GLUE's pair). When a task's records were finetuned at more than one budget (steps, batch,
learning rate, length, evaluation set), the table says so rather than mixing them; the attention transfer's settings
belong to each row's model.
"""

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

METRICS = {"sst2": ["eval_accuracy"], "qnli": ["eval_accuracy"], "qqp": ["eval_accuracy", "eval_f1"]}
MODELS = {
    "minilm": "all-MiniLM-L6-v2 (teacher, softmax)",
    "learned_kernel": "MiniLM -> learned kernel (m = 64), transfer on the task, distilled",
    "nested": "MiniLM -> nested Luna (l = 16), transfer on the task, distilled",
    "learned_kernel_general": "MiniLM -> learned kernel (m = 64), converted once (general text)",
    "nested_general": "MiniLM -> nested Luna (l = 16), converted once (general text)",
}
BUDGET = ("finetune_steps", "batch", "learning_rate", "max_seq_length", "evaluated_on")
TEACHER = "minilm"


def read_records(folder: Path) -> list[dict]:
    records = []
    for path in sorted(folder.glob("*.jsonl")):
        records += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not records:
        raise SystemExit(f"No records in {folder}/*.jsonl: run scripts/glue_runs.sh first.")
    return records


def summary(values: list[float]) -> str:
    spread = f" ± {100 * statistics.stdev(values):.2f}" if len(values) > 1 else ""
    return f"{100 * statistics.mean(values):.2f}{spread}"


def table(records: list[dict]) -> str:
    """The markdown table: per task, per model, per metric."""
    results = defaultdict(dict)  # (task, model) -> {seed: metrics}
    settings = defaultdict(set)
    transfer_steps = defaultdict(set)  # (task, model) -> the attention transfer's steps (none for the teacher)
    for record in records:
        results[record["task"], record["model"]][record["seed"]] = record["metrics"]
        if record["model"] != TEACHER:
            transfer_steps[record["task"], record["model"]].add(record["settings"].get("transfer_steps", 200))
        settings[record["task"]].add(tuple(record["settings"].get(key) for key in BUDGET))
    lines = ["| task | model | metric | per seed (%) | mean ± sd (%) | of the teacher | transfer steps |",
             "|---|---|---|---|---:|---:|---:|"]
    for task in [task for task in METRICS if any(key[0] == task for key in results)]:
        teacher = results.get((task, TEACHER), {})
        for model in [model for model in MODELS if (task, model) in results]:
            by_seed = results[task, model]
            seeds = sorted(by_seed)
            for metric in METRICS[task]:
                values = [by_seed[seed][metric] for seed in seeds]
                shared = [seed for seed in seeds if seed in teacher]
                share = ""
                if model != TEACHER and shared:
                    ours = statistics.mean(by_seed[seed][metric] for seed in shared)
                    share = f"{100 * ours / statistics.mean(teacher[seed][metric] for seed in shared):.1f}%"
                per_seed = ", ".join(f"{seed}: {100 * value:.2f}" for seed, value in zip(seeds, values, strict=True))
                name = metric.removeprefix("eval_")
                steps = ", ".join(str(step) for step in sorted(transfer_steps[task, model]))
                cells = [task, MODELS[model], name, per_seed, summary(values), share, steps]
                lines.append("| " + " | ".join(cells) + " |")
        if len(settings[task]) > 1:
            lines.append(f"| {task} | **the records mix {len(settings[task])} budgets** | | | | | |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", default="benchmarks/results/glue", help="Folder of the <task>.jsonl records.")
    parser.add_argument("--output", help="Write the table here too (markdown).")
    args = parser.parse_args(argv)
    text = table(read_records(Path(args.records)))
    if args.output:
        Path(args.output).write_text(text)
    print(text, end="")
    return text


if __name__ == "__main__":
    main()

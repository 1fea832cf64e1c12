#!/usr/bin/env python
"""The GLUE table (and the long-document one) from the records of scripts/glue_runs.sh
(benchmarks/results/glue/<task>.jsonl):

    python scripts/glue_report.py --output benchmarks/results/glue/table.md --readme README.md
    python scripts/glue_report.py --tasks brown_genres --output benchmarks/results/glue/long_documents.md

One row per task and model (a pair task's post-hoc transfer on one column, not the pairs, is a row of its own): the
metric per seed, the mean and sample standard deviation over the seeds, the mean as a share of MiniLM's mean on the
same task and seeds (the teacher of the GLUE rows), the attention transfer's steps, the tokens the model reads at
most, and the seconds per document of training and of prediction (the Trainer's runtimes, means over the seeds;
older records have no training time). QQP reports accuracy and F1 (GLUE's pair).
When a task's records were finetuned at more than one budget (steps, batch, learning rate, evaluation set), the table
says so rather than mixing them; the attention transfer's settings and the length belong to each row's model.
"""

import argparse
import json
import re
import statistics
from collections import defaultdict
from pathlib import Path

METRICS = {"sst2": ["eval_accuracy"], "qnli": ["eval_accuracy"], "qqp": ["eval_accuracy", "eval_f1"],
           "brown_genres": ["eval_accuracy"]}
MODELS = {
    "minilm": "all-MiniLM-L6-v2 (softmax)",
    "learned_kernel": "MiniLM -> learned kernel (m = 64), transfer on the task, distilled",
    "nested": "MiniLM -> nested Luna (l = 16), transfer on the task, distilled",
    "learned_kernel_one_column": "MiniLM -> learned kernel (m = 64), transfer on one column of the pairs, distilled",
    "nested_one_column": "MiniLM -> nested Luna (l = 16), transfer on one column of the pairs, distilled",
    "learned_kernel_general": "MiniLM -> learned kernel (m = 64), converted once (general text)",
    "nested_general": "MiniLM -> nested Luna (l = 16), converted once (general text)",
    "learned_kernel_general-4096": "MiniLM -> learned kernel (m = 16), 4,096 positions, converted once (news)",
}
SHORT_NAMES = {  # the README's short table
    "minilm": "MiniLM (teacher)",
    "learned_kernel": "learned kernel, post hoc",
    "nested": "nested Luna, post hoc",
    "learned_kernel_general": "learned kernel, converted once",
    "nested_general": "nested Luna, converted once",
}
README_MARKERS = ("<!-- glue-table -->\n", "<!-- /glue-table -->")
GLUE_TASKS = ("sst2", "qnli", "qqp")
PAIR_TASKS = ("qnli", "qqp")
POST_HOC = ("learned_kernel", "nested")
BUDGET = ("finetune_steps", "batch", "learning_rate", "evaluated_on")
TEACHER = "minilm"
SIZES = {"projected_length": "l", "kernel_num_projections": "m"}  # the settings' attention size, its symbol


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


def seconds_per_document(records: list[dict]) -> str:
    """Training and prediction seconds per document, means over the records (seeds) that timed them."""
    train = [r["metrics"]["train_runtime"] / (r["settings"]["finetune_steps"] * r["settings"]["batch"])
             for r in records if "train_runtime" in r["metrics"]]  # fmt: skip
    predict = [r["metrics"]["eval_runtime"] / r["metrics"]["eval_samples"] for r in records
               if "eval_runtime" in r["metrics"]]  # fmt: skip
    return " / ".join(f"{statistics.mean(times):.3f}" if times else "-" for times in (train, predict))


def row_model(record: dict) -> str:
    """The row a record belongs to: a pair task's post-hoc transfer that read one column (as records without
    `transfer_columns` did), not the pairs, has a row of its own."""
    one_column = len(record["settings"].get("transfer_columns", ["one"])) == 1
    post_hoc_pairs = record["task"] in PAIR_TASKS and record["model"] in POST_HOC
    return record["model"] + ("_one_column" if post_hoc_pairs and one_column else "")


def model_label(model: str, records: list[dict]) -> str:
    """The row's model name with the attention size its records carry (older records do not: the name's own). Records
    of two sizes in one row show both, as two transfer budgets do."""
    label = MODELS[model]
    for key, symbol in SIZES.items():
        sizes = sorted({record["settings"][key] for record in records if key in record["settings"]})
        if sizes:
            label = re.sub(rf"\({symbol} = \d+\)", f"({symbol} = {', '.join(map(str, sizes))})", label)
    return label


def unsized(label: str) -> str:
    """A model name without its attention size: how the README's table finds a row's model."""
    return re.sub(r"\(([lm]) = [\d, ]+\)", r"(\1)", label)


def table(records: list[dict], tasks: list[str]) -> str:
    """The markdown table: per task, per model, per metric."""
    results = defaultdict(dict)  # (task, model) -> {seed: record}
    settings = defaultdict(set)
    for record in records:
        results[record["task"], row_model(record)][record["seed"]] = record
        settings[record["task"]].add(tuple(record["settings"].get(key) for key in BUDGET))
    lines = ["| task | model | metric | per seed (%) | mean ± sd (%) | of MiniLM | transfer steps | max length "
             "| s per document, train / predict |", "|---|---|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for task in [task for task in tasks if any(key[0] == task for key in results)]:
        teacher = {seed: record["metrics"] for seed, record in results.get((task, TEACHER), {}).items()}
        for model in [model for model in MODELS if (task, model) in results]:
            by_seed = {seed: record["metrics"] for seed, record in results[task, model].items()}
            seeds, kept = sorted(by_seed), list(results[task, model].values())
            transfers = {r["settings"].get("transfer_steps", 200) for r in kept if model != TEACHER}
            steps = ", ".join(map(str, sorted(transfers)))
            length = ", ".join(sorted({str(r["settings"].get("max_seq_length", "")) for r in kept}))
            for metric in METRICS[task]:
                values = [by_seed[seed][metric] for seed in seeds]
                shared = [seed for seed in seeds if seed in teacher]
                share = ""
                if model != TEACHER and shared:
                    ours = statistics.mean(by_seed[seed][metric] for seed in shared)
                    share = f"{100 * ours / statistics.mean(teacher[seed][metric] for seed in shared):.1f}%"
                per_seed = ", ".join(f"{seed}: {100 * value:.2f}" for seed, value in zip(seeds, values, strict=True))
                cells = [task, model_label(model, kept), metric.removeprefix("eval_"), per_seed, summary(values), share,
                         steps, length, seconds_per_document(kept)]  # fmt: skip
                lines.append("| " + " | ".join(cells) + " |")
        if len(settings[task]) > 1:
            lines.append(f"| {task} | **the records mix {len(settings[task])} budgets** | | | | | | | |")
    return "\n".join(lines) + "\n"


def short_table(full_table: str) -> str:
    """The README's table from the full one: each task's first metric, mean ± sd, share and seed count."""
    lines = ["| task | model | accuracy % | of MiniLM | seeds |", "|---|---|---:|---:|---:|"]
    names = {unsized(name): key for key, name in MODELS.items()}
    for line in full_table.splitlines()[2:]:
        cells = [cell.strip() for cell in line.split("|")[1:-1]]
        model = names.get(unsized(cells[1]))
        if model in SHORT_NAMES and cells[2] == "accuracy":
            seeds = len(cells[3].split(","))
            lines.append(f"| {cells[0]} | {SHORT_NAMES[model]} | {cells[4]} | {cells[5]} | {seeds} |")
    return "\n".join(lines) + "\n"


def replace_readme_table(readme: Path, full_table: str) -> None:
    """Rewrite the table between the README's glue-table markers."""
    text = readme.read_text()
    start, end = README_MARKERS
    if start not in text or end not in text.split(start, 1)[1]:
        raise SystemExit(f"{readme} has no {start.strip()} ... {end} block to rewrite.")
    before, rest = text.split(start, 1)
    readme.write_text(before + start + short_table(full_table) + end + rest.split(end, 1)[1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", default="benchmarks/results/glue", help="Folder of the <task>.jsonl records.")
    parser.add_argument("--output", help="Write the table here too (markdown).")
    parser.add_argument("--readme", help="Rewrite the short table between this file's glue-table markers.")
    parser.add_argument("--tasks", nargs="+", default=list(GLUE_TASKS), choices=list(METRICS))
    args = parser.parse_args(argv)
    if args.readme and set(args.tasks) - set(GLUE_TASKS):
        parser.error("--readme holds the GLUE table: give it with the GLUE --tasks only")
    text = table(read_records(Path(args.records)), args.tasks)
    if args.output:
        Path(args.output).write_text(text)
    if args.readme:
        replace_readme_table(Path(args.readme), text)
    print(text, end="")
    return text


if __name__ == "__main__":
    main()

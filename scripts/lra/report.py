#!/usr/bin/env python
"""Print the runs of `scripts/lra/run_lra.py` as a markdown table in the layout of the paper's Table 1, the paper's
numbers beside them: test accuracy (%) and training wall time per task and model.

    python scripts/lra/report.py --results_file outputs/lra/results.jsonl --config cpu
"""

import json
from dataclasses import dataclass
from pathlib import Path
from statistics import mean, stdev

from transformers import HfArgumentParser

TASKS = ("listops", "text", "retrieval", "image")
# Paper Table 1 ("Transformer (re-impl)" and Luna-16 rows) and Table 3 (Luna-16, P): test accuracy in %.
PAPER = {
    "transformer": {"listops": 37.11, "text": 65.21, "retrieval": 79.14, "image": 42.94},
    "luna16": {"listops": 37.43, "text": 65.74, "retrieval": 79.38, "image": 46.39},
    "luna16-pmean": {"listops": 38.06, "text": 65.81, "retrieval": 80.22},
}
NAMES = {"transformer": "Transformer (RoBERTa, SDPA)", "luna16": "Luna-16, [CLS]", "luna16-pmean": "Luna-16, P-mean"}


@dataclass
class ReportArguments:
    results_file: str = "outputs/lra/results.jsonl"
    config: str = "cpu"


def latest_runs(path: Path, config: str) -> dict:
    """The last run of every (model, task, seed): a rerun replaces the earlier line."""
    runs = {}
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        if entry["config"] == config:
            runs[(entry["model"], entry["task"], entry["seed"])] = entry
    return runs


def cell(entries: list[dict]) -> str:
    if not entries:
        return "—"
    accuracies = [100 * entry["test_accuracy"] for entry in entries]
    seconds = mean(entry["train_seconds"] for entry in entries)
    spread = f" ± {stdev(accuracies):.1f}" if len(accuracies) > 1 else ""
    return f"{mean(accuracies):.2f}{spread} ({seconds:.0f} s)"


def table(runs: dict) -> str:
    models = sorted({model for model, _, _ in runs}, key=lambda m: (m != "transformer", m))
    lines = ["| model | " + " | ".join(TASKS) + " | seeds |", "|---|" + "---:|" * (len(TASKS) + 1)]
    for model in models:
        per_task = {task: [e for (m, t, _), e in runs.items() if m == model and t == task] for task in TASKS}
        seeds = sorted({seed for (m, _, seed) in runs if m == model})
        lines.append(f"| {NAMES.get(model, model)} (this project) | "
                     + " | ".join(cell(per_task[task]) for task in TASKS) + f" | {', '.join(map(str, seeds))} |")
        if model in PAPER:
            lines.append(f"| {NAMES[model]} (paper) | "
                         + " | ".join(f"{PAPER[model].get(task, '—')}" for task in TASKS) + " | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    (args,) = HfArgumentParser(ReportArguments).parse_args_into_dataclasses(args=argv)
    path = Path(args.results_file)
    if not path.is_file():
        raise SystemExit(f"No results file {path}: run scripts/lra/run_lra.py first.")
    text = table(latest_runs(path, args.config))
    print(text)
    return text


if __name__ == "__main__":
    main()

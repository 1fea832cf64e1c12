#!/usr/bin/env python
"""Print the runs of `scripts/lra/run_lra.py` as a markdown table in the layout of the paper's Table 1, the paper's
numbers beside them: test accuracy (%, mean ± sd over seeds) and training wall time per task and model; then the
settings each task ran with, and a warning where models of one task did not run the same settings (not an equal-step
comparison). `--plot_file` draws validation accuracy against steps, one panel per task.

    python scripts/lra/report.py --results_file benchmarks/results/lra/equal_steps.jsonl --config small \
        --plot_file benchmarks/results/lra/curves.png
"""

import json
from dataclasses import dataclass
from pathlib import Path
from statistics import mean, stdev

from transformers import HfArgumentParser

TASKS = ("listops", "text", "retrieval", "image", "pathfinder")
# Paper Table 1 ("Transformer (re-impl)" and Luna-16 rows) and Table 3 (Luna-16, P): test accuracy in %.
PAPER = {
    "transformer": {"listops": 37.11, "text": 65.21, "retrieval": 79.14, "image": 42.94, "pathfinder": 71.83},
    "luna16": {"listops": 37.43, "text": 65.74, "retrieval": 79.38, "image": 46.39, "pathfinder": 78.36},
    "luna16-pmean": {"listops": 38.06, "text": 65.81, "retrieval": 80.22},
    # Shahbazi et al. 2025, Table 1, on the Skyformer harness (its own Transformer row: 38.71 / 61.55 / 80.93 /
    # 39.14 / 70.39; ../shared/notes/learned-kernel-attention.md, section 8).
    "learned-kernel": {"listops": 38.94, "text": 73.41, "retrieval": 81.02, "image": 64.32, "pathfinder": 69.52},
}
NAMES = {"transformer": "Transformer (RoBERTa, SDPA)", "luna16": "Luna-16, [CLS]", "luna16-pmean": "Luna-16, P-mean",
         "learned-kernel": "learned-kernel LUNA (2025), mean"}
# What must be equal across the models of one task for the comparison to be at equal steps.
SHARED_SETTINGS = ("max_length", "batch_size", "max_steps", "learning_rate", "warmup_steps", "num_layers",
                   "hidden_size")


@dataclass
class ReportArguments:
    results_file: str = "outputs/lra/results.jsonl"
    config: str = "cpu"
    plot_file: str | None = None


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


def ordered_models(runs: dict) -> list[str]:
    return sorted({model for model, _, _ in runs}, key=lambda m: (m != "transformer", m))


def table(runs: dict) -> str:
    lines = ["| model | " + " | ".join(TASKS) + " | seeds |", "|---|" + "---:|" * (len(TASKS) + 1)]
    for model in ordered_models(runs):
        per_task = {task: [e for (m, t, _), e in runs.items() if m == model and t == task] for task in TASKS}
        seeds = sorted({seed for (m, _, seed) in runs if m == model})
        lines.append(f"| {NAMES.get(model, model)} (this project) | "
                     + " | ".join(cell(per_task[task]) for task in TASKS) + f" | {', '.join(map(str, seeds))} |")
        if model in PAPER:
            lines.append(f"| {NAMES[model]} (paper) | "
                         + " | ".join(f"{PAPER[model].get(task, '—')}" for task in TASKS) + " | |")
    return "\n".join(lines)


def settings_table(runs: dict) -> str:
    """One line per task: the settings its runs share, or a warning naming the runs that differ."""
    lines = ["| task | input length | batch | steps | learning rate | warm-up | equal settings |", "|---|" + "---:|" * 5
             + "---|"]
    for task in TASKS:
        entries = {key: entry for key, entry in runs.items() if key[1] == task and "settings" in entry}
        if not entries:
            continue
        shared = {key: {name: entry["settings"][name] for name in SHARED_SETTINGS} for key, entry in entries.items()}
        first = next(iter(shared.values()))
        differing = [f"{model} s{seed}" for (model, _, seed), values in shared.items() if values != first]
        check = "yes" if not differing else "NO: " + ", ".join(differing) + " ran other settings"
        lines.append(f"| {task} | {first['max_length']} | {first['batch_size']} | {first['max_steps']} | "
                     f"{first['learning_rate']:g} | {first['warmup_steps']} | {check} |")
    return "\n".join(lines)


def plot(runs: dict, plot_file: str) -> None:
    """Validation accuracy against steps, one panel per task that has runs, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [task for task in TASKS if any(t == task and e.get("validation_curve") for (_, t, _), e in runs.items())]
    if not tasks:
        raise SystemExit("No run in the results file recorded a validation curve: nothing to plot.")
    figure, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.6), squeeze=False)
    colours = {model: f"C{i}" for i, model in enumerate(ordered_models(runs))}
    for axis, task in zip(axes[0], tasks, strict=True):
        for (model, t, seed), entry in sorted(runs.items()):
            if t != task or not entry.get("validation_curve"):
                continue
            steps, accuracies = zip(*entry["validation_curve"], strict=True)
            axis.plot(steps, [100 * a for a in accuracies], color=colours[model], alpha=0.8, marker=".",
                      label=f"{NAMES.get(model, model)} s{seed}")
        axis.set(title=task, xlabel="step", ylabel="validation accuracy (%)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    Path(plot_file).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(plot_file, dpi=110)
    print(f"Validation curves written to {plot_file}")


def main(argv: list[str] | None = None) -> str:
    (args,) = HfArgumentParser(ReportArguments).parse_args_into_dataclasses(args=argv)
    path = Path(args.results_file)
    if not path.is_file():
        raise SystemExit(f"No results file {path}: run scripts/lra/run_lra.py first.")
    runs = latest_runs(path, args.config)
    text = table(runs) + "\n\n" + settings_table(runs)
    print(text)
    if args.plot_file:
        plot(runs, args.plot_file)
    return text


if __name__ == "__main__":
    main()

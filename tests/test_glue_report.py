"""scripts/glue_report.py: the GLUE table from glue_runs.sh's records, checked against sums done here."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "glue_report.py"
spec = importlib.util.spec_from_file_location("glue_report", SCRIPT)
glue_report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(glue_report)
SETTINGS = {"finetune_steps": 300, "batch": 32, "learning_rate": 1e-4, "max_seq_length": 64, "evaluated_on": "dev"}


def write(folder: Path, task: str, rows: list[tuple], **transfer) -> None:
    folder.mkdir(exist_ok=True)
    with open(folder / f"{task}.jsonl", "a") as handle:
        for model, seed, metrics in rows:
            handle.write(json.dumps({"task": task, "model": model, "seed": seed, "metrics": metrics,
                                     "wall_seconds": 1, "settings": {**SETTINGS, **transfer}}) + "\n")  # fmt: skip


def test_means_spreads_and_shares_of_the_teacher(tmp_path):
    write(tmp_path, "qnli", [("minilm", 42, {"eval_accuracy": 0.80}), ("minilm", 0, {"eval_accuracy": 0.84}),
                             ("nested", 42, {"eval_accuracy": 0.76}), ("nested", 0, {"eval_accuracy": 0.80})])
    write(tmp_path, "qqp", [("minilm", 42, {"eval_accuracy": 0.75, "eval_f1": 0.70}),
                            ("learned_kernel", 42, {"eval_accuracy": 0.72, "eval_f1": 0.63})])  # fmt: skip
    # The convert-once rows were transferred otherwise but finetuned at the same budget: one table, not flagged.
    write(tmp_path, "qqp", [("nested_general", 42, {"eval_accuracy": 0.69, "eval_f1": 0.56})], route="general",
          transfer_steps=1200)  # fmt: skip
    text = glue_report.main(["--records", str(tmp_path), "--output", str(tmp_path / "table.md")])
    rows = {tuple(cell.strip() for cell in line.split("|")[1:4]): line for line in text.splitlines()[2:]}
    teacher, nested = rows["qnli", glue_report.MODELS["minilm"], "accuracy"], rows["qnli", glue_report.MODELS["nested"],
                                                                                  "accuracy"]  # fmt: skip
    assert "42: 80.00" in teacher and "0: 84.00" in teacher and "82.00 ± 2.83" in teacher  # sd of 80, 84: 2.828
    assert "78.00 ± 2.83" in nested and f"{100 * 0.78 / 0.82:.1f}%" in nested
    f1 = rows["qqp", glue_report.MODELS["learned_kernel"], "f1"]
    assert "63.00 |" in f1 and f"{100 * 0.63 / 0.70:.1f}%" in f1  # one seed: no spread
    general = rows["qqp", glue_report.MODELS["nested_general"], "f1"]
    assert "56.00 |" in general and f"{100 * 0.56 / 0.70:.1f}%" in general and "mix" not in text
    assert general.endswith("| 1200 |") and rows["qqp", glue_report.MODELS["learned_kernel"], "f1"].endswith("| 200 |")
    assert (tmp_path / "table.md").read_text() == text


def test_mixed_budgets_are_flagged_and_missing_records_refused(tmp_path):
    write(tmp_path, "sst2", [("minilm", 42, {"eval_accuracy": 0.86})])
    with open(tmp_path / "sst2.jsonl", "a") as handle:
        handle.write(json.dumps({"task": "sst2", "model": "nested", "seed": 42, "metrics": {"eval_accuracy": 0.8},
                                 "wall_seconds": 1, "settings": {"finetune_steps": 100}}) + "\n")  # fmt: skip
    assert "the records mix 2 budgets" in glue_report.main(["--records", str(tmp_path)])
    with pytest.raises(SystemExit, match="No records"):
        glue_report.main(["--records", str(tmp_path / "empty")])

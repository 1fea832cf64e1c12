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
    write(tmp_path, "qnli", [("minilm", 42, {"eval_accuracy": 0.80}), ("minilm", 0, {"eval_accuracy": 0.84})])
    write(tmp_path, "qnli", [("nested", 42, {"eval_accuracy": 0.76}), ("nested", 0, {"eval_accuracy": 0.80})],
          transfer_columns=["question", "sentence"])  # fmt: skip
    write(tmp_path, "qqp", [("minilm", 42, {"eval_accuracy": 0.75, "eval_f1": 0.70})])
    write(tmp_path, "qqp", [("learned_kernel", 42, {"eval_accuracy": 0.72, "eval_f1": 0.63})],
          transfer_columns=["question1", "question2"])  # fmt: skip
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
    assert "| 1200 | 64 |" in general and "| 200 | 64 |" in rows["qqp", glue_report.MODELS["learned_kernel"], "f1"]
    assert (tmp_path / "table.md").read_text() == text


def test_a_pair_task_transferred_on_one_column_is_a_row_of_its_own(tmp_path):
    """A pair task's post-hoc transfer on the pairs and on one column (or a record that does not say: older ones
    read one): two rows, each with its own seeds and share. SST-2's one column is its task's whole input."""
    write(tmp_path, "qnli", [("minilm", 42, {"eval_accuracy": 0.80}), ("minilm", 0, {"eval_accuracy": 0.84})])
    write(tmp_path, "qnli", [("learned_kernel", 42, {"eval_accuracy": 0.72}), ("learned_kernel", 0,
          {"eval_accuracy": 0.74})], route="posthoc", transfer_columns=["question", "sentence"])  # fmt: skip
    write(tmp_path, "qnli", [("learned_kernel", 42, {"eval_accuracy": 0.70})])
    write(tmp_path, "sst2", [("minilm", 0, {"eval_accuracy": 0.86}), ("nested", 0, {"eval_accuracy": 0.82})],
          transfer_columns=["sentence"])  # fmt: skip
    text = glue_report.main(["--records", str(tmp_path)])
    rows = {tuple(cell.strip() for cell in line.split("|")[1:3]): line for line in text.splitlines()[2:]}
    pairs, column = rows["qnli", glue_report.MODELS["learned_kernel"]], rows["qnli", glue_report.MODELS[
        "learned_kernel_one_column"]]  # fmt: skip
    assert "0: 74.00, 42: 72.00" in pairs and "73.00 ± 1.41" in pairs and f"{100 * 0.73 / 0.82:.1f}%" in pairs
    assert "42: 70.00 | 70.00 |" in column and f"{100 * 0.70 / 0.80:.1f}%" in column  # the teacher's seed 42 only
    assert ("sst2", glue_report.MODELS["nested"]) in rows and len(rows) == 5 and "mix" not in text
    readme = glue_report.short_table(text)
    assert "qnli | learned kernel, post hoc | 73.00 ± 1.41" in readme and "70.00" not in readme


def test_a_row_names_the_attention_size_its_records_carry(tmp_path):
    """Records that carry nested Luna's l (or the kernel's m) name it in the row, older ones keep the name's own; two
    sizes in one row are both shown. The README's short table still finds the rows."""
    pairs = {"transfer_columns": ["question1", "question2"]}
    write(tmp_path, "qqp", [("minilm", 42, {"eval_accuracy": 0.80, "eval_f1": 0.75})])
    write(tmp_path, "qqp", [("nested", 42, {"eval_accuracy": 0.78, "eval_f1": 0.70})], projected_length=64, **pairs)
    write(tmp_path, "qqp", [("learned_kernel", 42, {"eval_accuracy": 0.79, "eval_f1": 0.74})],
          kernel_num_projections=64, **pairs)  # fmt: skip
    write(tmp_path, "qqp", [("learned_kernel", 0, {"eval_accuracy": 0.77, "eval_f1": 0.72})],
          kernel_num_projections=32, **pairs)  # fmt: skip
    write(tmp_path, "qqp", [("nested_general", 42, {"eval_accuracy": 0.70, "eval_f1": 0.60})], route="general")
    text = glue_report.main(["--records", str(tmp_path)])
    names = {line.split("|")[2].strip() for line in text.splitlines()[2:]}
    assert "MiniLM -> nested Luna (l = 64), transfer on the task, distilled" in names
    assert "MiniLM -> learned kernel (m = 32, 64), transfer on the task, distilled" in names
    assert glue_report.MODELS["nested_general"] in names and "(l = 16)" in glue_report.MODELS["nested_general"]
    readme = tmp_path / "README.md"
    readme.write_text("".join(glue_report.README_MARKERS))
    glue_report.replace_readme_table(readme, text)
    short = readme.read_text()
    assert "| qqp | nested Luna, post hoc | 78.00 | 97.5% | 1 |" in short
    assert "| qqp | learned kernel, post hoc | 78.00 ± 1.41 |" in short and "nested Luna, converted once" in short


def test_long_documents_rows_read_their_own_length_and_report_seconds_per_document(tmp_path):
    """The long-document task: MiniLM reads 512 tokens and the converted model 4,096 at one budget (not a mix); the
    seconds per document are the Trainer's runtimes over the documents seen, averaged over the seeds."""
    budget = {"finetune_steps": 176, "batch": 4}
    for model, length, runtimes in [("minilm", 512, [(35.2, 15.0), (39.6, 16.5)]),
                                    ("learned_kernel_general-4096", 4096, [(1232.0, 120.0), (1408.0, 135.0)])]:
        for seed, (train, predict) in enumerate(runtimes):
            metrics = {"eval_accuracy": 0.4 + seed / 10, "train_runtime": train, "eval_runtime": predict,
                       "eval_samples": 150}
            write(tmp_path, "brown_genres", [(model, seed, metrics)], max_seq_length=length, **budget)
    write(tmp_path, "sst2", [("minilm", 0, {"eval_accuracy": 0.86, "eval_runtime": 8.72, "eval_samples": 872})])
    text = glue_report.main(["--records", str(tmp_path), "--tasks", "brown_genres"])
    rows = {line.split("|")[2].strip(): line for line in text.splitlines()[2:]}
    assert "mix" not in text and "sst2" not in text and len(rows) == 2
    minilm, luna = rows[glue_report.MODELS["minilm"]], rows[glue_report.MODELS["learned_kernel_general-4096"]]
    assert "| 512 |" in minilm and f"| {(35.2 + 39.6) / 2 / 704:.3f} / {(15.0 + 16.5) / 2 / 150:.3f} |" in minilm
    assert "| 4096 |" in luna and f"| {(1232 + 1408) / 2 / 704:.3f} / {(120 + 135) / 2 / 150:.3f} |" in luna
    assert "45.00 ± 7.07" in luna and "100.0%" in luna
    assert "| - / 0.010 |" in glue_report.main(["--records", str(tmp_path)])  # an older record: no training time


def test_mixed_budgets_are_flagged_and_missing_records_refused(tmp_path):
    write(tmp_path, "sst2", [("minilm", 42, {"eval_accuracy": 0.86})])
    with open(tmp_path / "sst2.jsonl", "a") as handle:
        handle.write(json.dumps({"task": "sst2", "model": "nested", "seed": 42, "metrics": {"eval_accuracy": 0.8},
                                 "wall_seconds": 1, "settings": {"finetune_steps": 100}}) + "\n")  # fmt: skip
    assert "the records mix 2 budgets" in glue_report.main(["--records", str(tmp_path)])
    with pytest.raises(SystemExit, match="No records"):
        glue_report.main(["--records", str(tmp_path / "empty")])


def test_the_readme_block_is_rewritten_from_the_records_and_nothing_else_changes(tmp_path):
    write(tmp_path, "sst2", [("minilm", 0, {"eval_accuracy": 0.86}), ("minilm", 1, {"eval_accuracy": 0.84}),
                             ("learned_kernel", 0, {"eval_accuracy": 0.85})])  # fmt: skip
    readme = tmp_path / "README.md"
    readme.write_text("# title\n\n<!-- glue-table -->\n| old | table |\n<!-- /glue-table -->\n\nafter\n")
    glue_report.main(["--records", str(tmp_path), "--readme", str(readme)])
    assert readme.read_text() == (
        "# title\n\n<!-- glue-table -->\n"
        "| task | model | accuracy % | of MiniLM | seeds |\n|---|---|---:|---:|---:|\n"
        "| sst2 | MiniLM (teacher) | 85.00 ± 1.41 |  | 2 |\n"
        f"| sst2 | learned kernel, post hoc | 85.00 | {100 * 0.85 / 0.86:.1f}% | 1 |\n<!-- /glue-table -->\n\nafter\n"
    )
    with pytest.raises(SystemExit):  # argparse's error: the long-document table has no place in the README
        glue_report.main(["--records", str(tmp_path), "--readme", str(readme), "--tasks", "brown_genres"])
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="no <!-- glue-table --> ... <!-- /glue-table --> block"):
        glue_report.main(["--records", str(tmp_path), "--readme", str(readme)])
    assert readme.read_text() == "no markers\n"

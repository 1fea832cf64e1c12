#!/usr/bin/env python
"""How close converted models' sentence embeddings stay to their original's: the cosine similarity between the
sentence-transformers embeddings (the folder's own modules when it has them, else mean pooling) that the original and
each converted model give the same sentence.

    python scripts/embedding_similarity.py --original all-MiniLM-L6-v2 \
        --models minilm-learned_kernel minilm-learned_kernel-transferred \
        --sentences_file glue/sst2/dev.tsv --output benchmarks/results/conversion/embedding_similarity.md

A converted folder (scripts/convert_to_luna.py, scripts/transfer_attention.py) has no sentence-transformers modules,
so it gets mean pooling over the real tokens, which is all-MiniLM-L6-v2's own pooling (its final normalisation does
not change a cosine). Sentences come from a .tsv with a header row (`--text_column`) or a text file, one per line.
"""

import csv
import os
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from sentence_transformers import SentenceTransformer
from transformers import HfArgumentParser

import luna_hf  # noqa: F401  (registers Luna with the Auto classes)


@dataclass
class SimilarityArguments:
    original: str = field(metadata={"help": "The original model's folder (BERT, RoBERTa, sentence-transformers)."})
    models: list[str] = field(metadata={"help": "Converted model folders to compare with it."})
    sentences_file: str = field(metadata={"help": "A .tsv with a header row, or a text file with one sentence a line."})
    text_column: str = field(default="sentence", metadata={"help": "The .tsv's text column."})
    max_samples: int | None = field(default=None, metadata={"help": "Use the first N sentences only."})
    batch_size: int = 64
    output: str | None = field(default=None, metadata={"help": "Also write the table to this Markdown file."})


def read_sentences(path: str, column: str, max_samples: int | None) -> list[str]:
    if not os.path.isfile(path):
        sys.exit(f"error: --sentences_file {path} does not exist")
    with open(path, encoding="utf-8", newline="") as handle:
        if path.endswith(".tsv"):
            reader = csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
            if column not in (reader.fieldnames or []):
                sys.exit(f"error: {path} has no column {column!r} (columns: {reader.fieldnames}); pass --text_column")
            sentences = [row[column] for row in reader]
        else:
            sentences = [line.strip() for line in handle if line.strip()]
    sentences = sentences[:max_samples]
    if not sentences:
        sys.exit(f"error: {path} holds no sentences")
    return sentences


def embed(folder: str, sentences: list[str], batch_size: int) -> torch.Tensor:
    if not os.path.isdir(folder):
        sys.exit(f"error: {folder} is not a model folder")
    model = SentenceTransformer(folder, device="cpu", trust_remote_code=True)
    return model.encode(sentences, batch_size=batch_size, convert_to_tensor=True, show_progress_bar=True)


def similarity_table(args: SimilarityArguments, sentences: list[str]) -> str:
    original = embed(args.original, sentences, args.batch_size)
    lines = [
        f"Cosine similarity to `{Path(args.original).name}`'s sentence embeddings, {len(sentences)} sentences of "
        f"`{args.sentences_file}`:",
        "",
        "| model | mean | sd | min |",
        "|---|---:|---:|---:|",
    ]
    for folder in args.models:
        cosine = torch.nn.functional.cosine_similarity(original, embed(folder, sentences, args.batch_size)).tolist()
        sd = statistics.stdev(cosine) if len(cosine) > 1 else 0.0
        lines.append(f"| `{Path(folder).name}` | {statistics.mean(cosine):.4f} | {sd:.4f} | {min(cosine):.4f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    (args,) = HfArgumentParser(SimilarityArguments).parse_args_into_dataclasses(args=argv)
    table = similarity_table(args, read_sentences(args.sentences_file, args.text_column, args.max_samples))
    print(table)
    if args.output:
        os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
        with open(args.output + ".partial", "w", encoding="utf-8") as handle:
            handle.write(table)
        os.replace(args.output + ".partial", args.output)
    return table


if __name__ == "__main__":
    main()

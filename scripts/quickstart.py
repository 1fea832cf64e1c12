#!/usr/bin/env python
"""Quickstart, on a 2-core CPU in about 10 minutes: build a pretraining corpus (the Hub's wikitext-103 when it is
reachable, otherwise text from package registries: see scripts/prepare_corpus.py), pretrain a small Luna with masked
language modelling, finetune it on SST-2, print its dev accuracy and a few `pipeline()` predictions.

    GLUE_DIR=../shared/data/glue python scripts/quickstart.py

SST-2 comes from a local GLUE folder (`--glue_dir DIR` or `GLUE_DIR=DIR`, holding `sst2/train.tsv` and
`sst2/dev.tsv` or `SST-2/...`), otherwise from the Hub (`nyu-mll/glue`). `--model_type roberta` runs the identical
pipeline on a same-size RoBERTa, for a side-by-side comparison. Each step is one of the project's scripts, printed
before it runs; a step whose output already exists is skipped, so an interrupted quickstart continues where it
stopped (delete `--output_dir` to start over).
"""

import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from transformers import HfArgumentParser, pipeline

import luna_hf  # noqa: F401  (registers "luna" with the Auto classes)

SCRIPTS = Path(__file__).resolve().parent
SENTENCES = [
    "A gorgeous, witty and deeply moving film.",
    "The plot is dull and the acting is even worse.",
    "It is not a bad movie, but I would not watch it again.",
]


@dataclass
class QuickstartArguments:
    glue_dir: str | None = field(default=None, metadata={"help": "Local GLUE folder with SST-2. Default: $GLUE_DIR."})
    model_type: Literal["luna", "roberta"] = field(default="luna", metadata={"help": "Architecture to pretrain."})
    output_dir: str = field(default="outputs/quickstart", metadata={"help": "Models, metrics and logs go here."})
    corpus_dir: str = field(
        default="data/corpus", metadata={"help": "Pretraining corpus: train.txt, validation.txt (built if absent)."}
    )
    pretrain_steps: int = field(default=400, metadata={"help": "MLM steps of 16 blocks of 128 tokens."})
    max_train_samples: int | None = field(default=20000, metadata={"help": "SST-2 training rows used (all: 0)."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "SST-2 finetuning epochs."})
    seed: int = 42

    def __post_init__(self):
        self.glue_dir = self.glue_dir or os.environ.get("GLUE_DIR") or None
        if self.pretrain_steps < 1 or self.num_train_epochs <= 0:
            raise ValueError("--pretrain_steps and --num_train_epochs must be positive.")


def sst2_source(glue_dir: str | None) -> list[str]:
    """The finetuning script's data arguments; fails before any training when SST-2 cannot be had."""
    if glue_dir:
        if not any((Path(glue_dir) / name / "dev.tsv").is_file() for name in ("sst2", "SST-2")):
            raise SystemExit(f"No sst2/dev.tsv or SST-2/dev.tsv under --glue_dir/GLUE_DIR {glue_dir!r}.")
        return ["--glue_dir", glue_dir]
    from huggingface_hub import HfApi

    try:
        HfApi().dataset_info("nyu-mll/glue", timeout=10)
    except Exception as error:
        raise SystemExit(
            f"SST-2 is needed and the Hub cannot be reached ({type(error).__name__}). Download GLUE's SST-2 "
            "(train.tsv, dev.tsv) into DIR/sst2/ and run again with GLUE_DIR=DIR or --glue_dir DIR "
            "(in this project's workspace: GLUE_DIR=../shared/data/glue)."
        ) from None
    return []


def run_step(title: str, script: str, *arguments: str):
    command = [sys.executable, str(SCRIPTS / script), *arguments]
    print(f"\n=== {title}\n$ {shlex.join(command)}\n", flush=True)
    code = subprocess.run(command).returncode
    if code:
        raise SystemExit(
            f"{script} failed (exit code {code}); its messages are above. Finished steps are kept: "
            "run the quickstart again to continue from the failed step."
        )


def main():
    (args,) = HfArgumentParser(QuickstartArguments).parse_args_into_dataclasses()
    data_arguments = sst2_source(args.glue_dir)
    output_dir, corpus = Path(args.output_dir), Path(args.corpus_dir)
    pretrained, finetuned = output_dir / f"{args.model_type}-small-mlm", output_dir / f"{args.model_type}-small-sst2"

    if not (corpus / "train.txt").is_file():
        run_step("1/3 Build the pretraining corpus", "prepare_corpus.py", "--output_dir", str(corpus))
    if not (pretrained / "model.safetensors").is_file():
        # Peak learning rate 3e-4: at 1e-3, with this short warm-up, the small Luna collapses within 100 steps (the
        # unpack output outgrows the residual and every token state becomes the same), and SST-2 stays at chance.
        run_step(
            f"2/3 Pretrain a small {args.model_type} (masked language modelling)", "pretrain_mlm.py",
            "--model_type", args.model_type, "--preset", "luna-small", "--train_tokenizer", "--vocab_size", "8192",
            "--train_file", str(corpus / "train.txt"), "--validation_file", str(corpus / "validation.txt"),
            "--max_seq_length", "128", "--per_device_train_batch_size", "16", "--learning_rate", "3e-4",
            "--max_train_steps", str(args.pretrain_steps), "--eval_steps", str(args.pretrain_steps),
            "--max_eval_samples", "256", "--checkpointing_steps", "100", "--resume_from_checkpoint", "latest",
            "--seed", str(args.seed), "--output_dir", str(pretrained),
        )  # fmt: skip
    if not (finetuned / "eval_results.json").is_file():
        samples = ["--max_train_samples", str(args.max_train_samples)] if args.max_train_samples else []
        run_step(
            "3/3 Finetune on SST-2 with the Trainer", "finetune_glue.py",
            "--model_name_or_path", str(pretrained), "--task_name", "sst2", *data_arguments, *samples,
            "--do_train", "--do_eval", "--max_seq_length", "128", "--per_device_train_batch_size", "32",
            "--learning_rate", "1e-4", "--warmup_steps", "0.06", "--weight_decay", "0.1",
            "--num_train_epochs", str(args.num_train_epochs), "--eval_strategy", "no", "--save_strategy", "no",
            "--report_to", "none", "--seed", str(args.seed), "--output_dir", str(finetuned),
        )  # fmt: skip

    mlm = json.loads((pretrained / "all_results.json").read_text())
    accuracy = json.loads((finetuned / "eval_results.json").read_text())["eval_accuracy"]
    print(
        f"\n=== {args.model_type}-small: MLM validation loss {mlm['eval_loss']:.3f} after {mlm['step']} steps; "
        f"SST-2 dev accuracy {accuracy:.4f}"
    )
    classify = pipeline("text-classification", model=str(finetuned), trust_remote_code=True)
    for sentence, prediction in zip(SENTENCES, classify(SENTENCES), strict=True):
        print(f"  {prediction['label']:>8} {prediction['score']:.3f}  {sentence}")
    fill_mask = pipeline("fill-mask", model=str(pretrained), trust_remote_code=True)
    masked = f"The film was one of the best of the {fill_mask.tokenizer.mask_token}."
    print(f"  fill-mask {masked!r}: {[p['token_str'].strip() for p in fill_mask(masked, top_k=5)]}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Attention transfer: train the new attention of a converted Luna model to imitate the original's attention. The
command line of `luna_hf.transfer_attention`, which holds the method (and describes it in full).

    python scripts/transfer_attention.py --model_name_or_path minilm-luna --teacher_name_or_path all-MiniLM-L6-v2 \
        --train_file glue/SST-2/train.tsv --text_column sentence --max_samples 500 \
        --output_dir transfer-checkpoints --transferred_model_dir minilm-luna-transferred \
        --max_steps 100 --per_device_train_batch_size 16 --learning_rate 1e-3

`--model_name_or_path` is a folder written by `scripts/convert_to_luna.py` from `--teacher_name_or_path`. Only the
new attention is trained (`luna_hf.conversion.TRANSFERRED_PARAMETERS`: the feature maps of the learned-kernel
attention; P, the pack attention and the unpack attention of the nested one, whose query and output projections
start as BERT's); the teacher and everything else the conversion copied stay frozen. Each student layer is fed the
teacher's input of that layer, and the loss is the mean over layers of the mean squared error between the two
attention outputs (after the output projection, before the residual) over the real tokens, so the layers train
independently (as in LoLCATs); with `--transfer_loss attention_kl` (learned kernel only) it is KL(teacher ||
student) of the attention weights instead (Hedgehog). P still flows through the student's layers. Dropout is off in
both models. The Trainer gives the progress bar, the seed and the checkpoints in `--output_dir`
(`--resume_from_checkpoint`); the transferred model (with its head and tokenizer) is written to
`--transferred_model_dir` through a staging folder, renamed when complete. Then fine-tune it on the task with
`scripts/finetune_glue.py`. See docs/conversion.md.
"""

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import datasets
from transformers import AutoModel, AutoTokenizer, HfArgumentParser, TrainingArguments

import luna_hf
from luna_hf.conversion import AUTO_CLASS_NAMES, save_folder
from luna_hf.model_card import write_model_card
from luna_hf.text_sources import passages

logger = logging.getLogger(__name__)


@dataclass
class TransferArguments:
    model_name_or_path: str = field(metadata={"help": "The converted Luna folder (scripts/convert_to_luna.py)."})
    teacher_name_or_path: str = field(metadata={"help": "The original BERT or RoBERTa folder it was converted from."})
    transferred_model_dir: str = field(metadata={"help": "Where to write the transferred model (must not exist)."})
    train_file: str | None = field(
        default=None,
        metadata={"help": "Text to imitate on: a text per line (a tab between a pair's two), or a .tsv with a header."},
    )
    text_column: str = field(default="sentence", metadata={"help": "The .tsv's or the dataset's text column."})
    text_pair_column: str | None = field(
        default=None,
        metadata={"help": "A second column read with the first as a pair ([SEP] between them), as a pair task's "
                          "model reads its inputs: e.g. --text_column question --text_pair_column sentence (QNLI)."},
    )  # fmt: skip
    dataset_name: str | None = field(default=None, metadata={"help": "A `datasets` name instead of --train_file."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "The dataset's configuration."})
    dataset_split: str = field(default="train", metadata={"help": "The dataset's split."})
    passages: bool = field(
        default=False,
        metadata={
            "help": "The texts are documents (scripts/prepare_corpus.py's train.txt): cut them into sentences, "
            "passages and sentence pairs of the lengths sentence tasks read (luna_hf.text_sources.passages)."
        },
    )
    passages_seed: int = field(default=0, metadata={"help": "The order of the passages (--passages)."})
    max_samples: int | None = field(default=None, metadata={"help": "Use the first N texts only."})
    max_length: int = field(default=128, metadata={"help": "Truncate texts to this many tokens."})
    transfer_loss: Literal["output_mse", "attention_kl"] = field(
        default="output_mse",
        metadata={
            "help": "What each layer imitates: 'output_mse', the attention's output (LoLCATs); 'attention_kl', the "
            "attention weights, KL(teacher || student) per real query (Hedgehog; learned_kernel only)."
        },
    )


def read_columns(args: TransferArguments, names: list[str]) -> list[list[str]]:
    """The named columns of the dataset or of the .tsv (its first line a header)."""
    if args.dataset_name is not None:
        split = datasets.load_dataset(args.dataset_name, args.dataset_config_name, split=args.dataset_split)
        source, header = args.dataset_name, split.column_names
    else:
        lines = Path(args.train_file).read_text(encoding="utf-8").splitlines()
        source, header = args.train_file, lines[0].split("\t") if lines else []
    for name in names:
        if name not in header:
            raise ValueError(f"{source} has no column {name!r}; its columns: {header}.")
    if args.dataset_name is not None:
        return [list(split[name]) for name in names]
    rows = [line.split("\t") for line in lines[1:] if line.strip()]
    return [[row[header.index(name)] for row in rows] for name in names]


def read_texts(args: TransferArguments) -> list[str | tuple[str, str]]:
    if (args.train_file is None) == (args.dataset_name is None):
        raise ValueError("Pass exactly one of --train_file and --dataset_name.")
    if args.passages and args.text_pair_column:
        raise ValueError("--passages cuts documents into passages and pairs of its own: drop --text_pair_column.")
    if args.dataset_name is not None or args.train_file.endswith(".tsv"):
        columns = read_columns(args, [args.text_column, *filter(None, [args.text_pair_column])])
        texts = columns[0] if len(columns) == 1 else list(zip(*columns, strict=True))
    elif args.text_pair_column:
        raise ValueError("--text_pair_column reads a .tsv or a dataset; in a text file, a tab separates a pair.")
    else:  # a tab separates a pair's two texts
        lines = Path(args.train_file).read_text(encoding="utf-8").splitlines()
        texts = [tuple(line.split("\t", 1)) if "\t" in line else line for line in lines if line.strip()]
    if args.passages:
        texts = passages(texts, seed=args.passages_seed)
    return texts[: args.max_samples] if args.max_samples else texts


def write_card(folder: Path, model, args: TransferArguments, steps: int, texts: int, loss: float | None) -> None:
    name, teacher = Path(args.transferred_model_dir).name, args.teacher_name_or_path
    write_model_card(
        folder, config=model.config, script="scripts/transfer_attention.py", model_id=name,
        load_class=AUTO_CLASS_NAMES.get(type(model).__name__, "AutoModel"),
        title=f"{name}: attention transferred from {Path(teacher).name}",
        summary=f"`{args.model_name_or_path}` (converted by scripts/convert_to_luna.py) after {steps} steps of "
                f"attention transfer from `{teacher}`: only the new attention was trained (what the conversion "
                "added; in nested Luna also the unpack attention's query and output projections), so that each "
                "layer's attention output imitates the original's.",
        data=f"{texts} texts from `{args.train_file or args.dataset_name}`, at most {args.max_length} tokens each.",
        metrics={"attention_transfer_loss": loss} if loss is not None else {},
        limitations=["Not fine-tuned on a task: fine-tune it (scripts/finetune_glue.py) before use.",
                     "The weights are the original's but for the new attention: its license and terms apply."],
    )  # fmt: skip


def main(argv=None):
    logging.basicConfig(format="%(levelname)s: %(message)s", level=logging.INFO)
    args, training_args = HfArgumentParser((TransferArguments, TrainingArguments)).parse_args_into_dataclasses(argv)
    destination = Path(args.transferred_model_dir)
    if destination.exists():
        sys.exit(f"error: --transferred_model_dir {destination} exists.")

    # Phase 1: the models (the student is saved whole, head included) and the text.
    student_class = getattr(luna_hf, luna_hf.LunaConfig.from_pretrained(args.model_name_or_path).architectures[0])
    student = student_class.from_pretrained(args.model_name_or_path)
    teacher = AutoModel.from_pretrained(args.teacher_name_or_path, attn_implementation="eager")
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    try:
        texts = read_texts(args)
        logger.info("%d texts from %s", len(texts), args.train_file or args.dataset_name)

        # Phase 2: train the new attention (the Trainer's checkpoints in --output_dir, resumable), then save.
        result = luna_hf.transfer_attention(student, teacher, texts, tokenizer, transfer_loss=args.transfer_loss,
                                            max_length=args.max_length, training_args=training_args)  # fmt: skip
    except ValueError as error:
        sys.exit(f"error: {error}")
    logger.info("Trained %d tensors of %s", len(result.trained_parameters), args.model_name_or_path)
    save_folder(student, tokenizer, destination, write_readme=lambda folder: write_card(
        folder, student, args, result.steps, len(texts), result.training_loss))  # fmt: skip
    print(f"Transferred attention of {args.model_name_or_path} -> {destination}")


if __name__ == "__main__":
    main()

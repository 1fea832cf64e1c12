#!/usr/bin/env python
"""Attention transfer: train the new attention of a converted Luna model to imitate the original's attention.

    python scripts/transfer_attention.py --model_name_or_path minilm-luna --teacher_name_or_path all-MiniLM-L6-v2 \
        --train_file glue/SST-2/train.tsv --text_column sentence --max_samples 500 \
        --output_dir transfer-checkpoints --transferred_model_dir minilm-luna-transferred \
        --max_steps 100 --per_device_train_batch_size 16 --learning_rate 1e-3

`--model_name_or_path` is a folder written by `scripts/convert_to_luna.py` from `--teacher_name_or_path`. Only the
new attention is trained (`convert_to_luna.TRANSFERRED_PARAMETERS`: the feature maps of the learned-kernel
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
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import datasets
import torch
from convert_to_luna import is_transferred_parameter
from torch import nn
from transformers import (
    AutoModel,
    AutoTokenizer,
    DataCollatorWithPadding,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
)

import luna_hf
from luna_hf.model_card import write_model_card

logger = logging.getLogger(__name__)
LOAD_CLASSES = {
    "LunaForMaskedLM": "AutoModelForMaskedLM",
    "LunaForSequenceClassification": "AutoModelForSequenceClassification",
    "LunaForMultipleChoice": "AutoModelForMultipleChoice",
    "LunaForTokenClassification": "AutoModelForTokenClassification",
    "LunaForQuestionAnswering": "AutoModelForQuestionAnswering",
}


@dataclass
class TransferArguments:
    model_name_or_path: str = field(metadata={"help": "The converted Luna folder (scripts/convert_to_luna.py)."})
    teacher_name_or_path: str = field(metadata={"help": "The original BERT or RoBERTa folder it was converted from."})
    transferred_model_dir: str = field(metadata={"help": "Where to write the transferred model (must not exist)."})
    train_file: str | None = field(
        default=None, metadata={"help": "Text to imitate on: one text per line, or a .tsv with a header row."}
    )
    text_column: str = field(default="sentence", metadata={"help": "The .tsv's or the dataset's text column."})
    dataset_name: str | None = field(default=None, metadata={"help": "A `datasets` name instead of --train_file."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "The dataset's configuration."})
    dataset_split: str = field(default="train", metadata={"help": "The dataset's split."})
    max_samples: int | None = field(default=None, metadata={"help": "Use the first N texts only."})
    max_length: int = field(default=128, metadata={"help": "Truncate texts to this many tokens."})
    transfer_loss: Literal["output_mse", "attention_kl"] = field(
        default="output_mse",
        metadata={
            "help": "What each layer imitates: 'output_mse', the attention's output (LoLCATs); 'attention_kl', the "
            "attention weights, KL(teacher || student) per real query (Hedgehog; learned_kernel only)."
        },
    )


class AttentionTransfer(nn.Module):
    """The frozen teacher and the student's encoder; `forward` returns the mean per-layer loss (`loss`) and the loss
    of each layer (`layer_losses`)."""

    def __init__(self, student: luna_hf.LunaModel, teacher: nn.Module, transfer_loss: str = "output_mse"):
        super().__init__()
        if transfer_loss == "attention_kl" and student.config.attention_type != "learned_kernel":
            raise ValueError(
                "--transfer_loss attention_kl needs the learned-kernel attention: nested Luna's tokens "
                "attend to P, not to each other, so there are no weights to compare with the teacher's."
            )
        self.student, self.transfer_loss = student, transfer_loss
        # Not a submodule: the Trainer's checkpoints then hold the student alone, and its optimizer never sees it.
        self.frozen_teacher = (teacher.eval().requires_grad_(False),)
        self.teacher_inputs = None  # the teacher's layer inputs, set per batch
        student_layers, teacher_layers = student.layers, teacher.encoder.layer
        if len(student_layers) != len(teacher_layers):
            raise ValueError(f"The student has {len(student_layers)} layers, the teacher {len(teacher_layers)}.")
        self.teacher_outputs, self.student_outputs = [None] * len(teacher_layers), [None] * len(teacher_layers)
        for index, (student_layer, teacher_layer) in enumerate(zip(student_layers, teacher_layers, strict=True)):
            # BERT's attention output is its output projection's (`attention.output.dense`), before dropout and the
            # residual; Luna's is the learned-kernel attention's or the unpack attention's first output.
            teacher_layer.attention.output.dense.register_forward_hook(self.recorder(self.teacher_outputs, index))
            student_layer.register_forward_pre_hook(self.teacher_input_feeder(index), with_kwargs=True)
            if student.config.attention_type == "learned_kernel":
                student_attention = student_layer.attention
            else:
                student_attention = student_layer.unpack_attention
            student_attention.register_forward_hook(self.recorder(self.student_outputs, index, returns_tuple=True))

    @staticmethod
    def recorder(outputs: list, index: int, returns_tuple: bool = False):
        def hook(module, args, output):
            outputs[index] = output[0] if returns_tuple else output

        return hook

    def teacher_input_feeder(self, index: int):
        """Replace the student layer's token states by the teacher's input of the same layer."""

        def hook(module, args, kwargs):
            return (self.teacher_inputs[index], *args[1:]), kwargs

        return hook

    def train(self, mode: bool = True):
        """Dropout stays off: the student imitates the teacher's deterministic attention."""
        return super().train(False)

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        teacher = self.frozen_teacher[0].to(input_ids.device)
        weights = self.transfer_loss == "attention_kl"
        with torch.no_grad():
            teacher_kwargs = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
            teacher_outputs = teacher(
                input_ids, attention_mask, output_hidden_states=True, output_attentions=weights, **teacher_kwargs
            )
        self.teacher_inputs = teacher_outputs.hidden_states
        student_kwargs = {"token_type_ids": token_type_ids} if self.student.config.type_vocab_size > 0 else {}
        student_outputs = self.student(input_ids, attention_mask, output_attentions=weights, **student_kwargs)
        real = attention_mask.bool()
        if weights:
            pairs = zip(student_outputs.attentions, teacher_outputs.attentions, strict=True)
            layer_losses = torch.stack([attention_kl(student, teacher, real) for student, teacher in pairs])
        else:
            pairs = zip(self.student_outputs, self.teacher_outputs, strict=True)
            layer_losses = torch.stack([nn.functional.mse_loss(s[real], t[real]) for s, t in pairs])
        return {"loss": layer_losses.mean(), "layer_losses": layer_losses}


def attention_kl(student: torch.Tensor, teacher: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of the attention weights (batch, heads, n, n), summed over the keys, averaged over the
    heads and the real queries: Hedgehog's soft-label cross-entropy less the teacher's entropy, so 0 when they agree.
    Padded keys carry no weight in either (a zero target adds nothing to `kl_div`)."""
    log_student = student.float().clamp(min=1e-12).log()
    divergence = nn.functional.kl_div(log_student, teacher.float(), reduction="none")
    per_query = divergence.sum(dim=-1).mean(dim=1)  # (batch, n)
    return per_query[real].mean()


def read_texts(args: TransferArguments) -> list[str]:
    if (args.train_file is None) == (args.dataset_name is None):
        raise ValueError("Pass exactly one of --train_file and --dataset_name.")
    if args.dataset_name is not None:
        split = datasets.load_dataset(args.dataset_name, args.dataset_config_name, split=args.dataset_split)
        texts = list(split[args.text_column])
    elif args.train_file.endswith(".tsv"):
        lines = Path(args.train_file).read_text(encoding="utf-8").splitlines()
        header = lines[0].split("\t")
        if args.text_column not in header:
            raise ValueError(f"{args.train_file} has no column {args.text_column!r}; its columns: {header}.")
        column = header.index(args.text_column)
        texts = [line.split("\t")[column] for line in lines[1:] if line.strip()]
    else:
        texts = [line for line in Path(args.train_file).read_text(encoding="utf-8").splitlines() if line.strip()]
    return texts[: args.max_samples] if args.max_samples else texts


def freeze_all_but_new_attention(model: luna_hf.LunaPreTrainedModel) -> list[str]:
    """Train the parameters that the conversion added (nested Luna: and the unpack attention's query and output
    projections), nothing else; returns their names."""
    trained = []
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(is_transferred_parameter(name, model.config.attention_type))
        if parameter.requires_grad:
            trained.append(name)
    return trained


def write_card(folder: Path, model, args: TransferArguments, steps: int, texts: int, loss: float | None) -> None:
    name, teacher = Path(args.transferred_model_dir).name, args.teacher_name_or_path
    write_model_card(
        folder, config=model.config, script="scripts/transfer_attention.py", model_id=name,
        load_class=LOAD_CLASSES.get(type(model).__name__, "AutoModel"),
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


def save_atomically(model, tokenizer, destination: Path, write_readme=None) -> None:
    """Write the folder next to `destination` and rename it when complete; `write_readme(folder)` adds the card."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if write_readme is not None:
            write_readme(staging)
        staging.rename(destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def main(argv=None):
    logging.basicConfig(format="%(levelname)s: %(message)s", level=logging.INFO)
    args, training_args = HfArgumentParser((TransferArguments, TrainingArguments)).parse_args_into_dataclasses(argv)
    destination = Path(args.transferred_model_dir)
    if destination.exists():
        sys.exit(f"error: --transferred_model_dir {destination} exists.")

    # Phase 1: the models. The student keeps its head (it is saved whole); only its encoder runs here.
    student_class = getattr(luna_hf, luna_hf.LunaConfig.from_pretrained(args.model_name_or_path).architectures[0])
    student = student_class.from_pretrained(args.model_name_or_path)
    teacher = AutoModel.from_pretrained(args.teacher_name_or_path, attn_implementation="eager")
    trained = freeze_all_but_new_attention(student)
    logger.info("Training %d tensors (%d parameters) of %s", len(trained),
                sum(p.numel() for p in student.parameters() if p.requires_grad), args.model_name_or_path)  # fmt: skip
    transfer = AttentionTransfer(student.base_model, teacher, args.transfer_loss)

    # Phase 2: the text.
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    texts = read_texts(args)
    encoded = tokenizer(texts, truncation=True, max_length=args.max_length)
    train_dataset = datasets.Dataset.from_dict(dict(encoded))
    logger.info("%d texts from %s", len(texts), args.train_file or args.dataset_name)

    # Phase 3: train (resumable from the Trainer's checkpoints) and write the model.
    training_args.remove_unused_columns = False
    trainer = Trainer(
        model=transfer,
        args=training_args,
        train_dataset=train_dataset,
        data_collator=DataCollatorWithPadding(tokenizer),
    )
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    save_atomically(
        student,
        tokenizer,
        destination,
        lambda folder: write_card(folder, student, args, result.global_step, len(texts), result.training_loss),
    )
    print(f"Transferred attention of {args.model_name_or_path} -> {destination}")


if __name__ == "__main__":
    main()

"""Attention transfer: train the new attention of a converted Luna model to imitate the original's attention.

    from luna_hf import convert_to_luna, transfer_attention

    student = convert_to_luna(teacher, attention="learned_kernel", tokenizer=tokenizer)
    result = transfer_attention(student, teacher, texts, tokenizer, max_steps=200)
    print(result.layer_losses[-1])  # each layer's loss on the last batch

Only the new attention is trained (`conversion.TRANSFERRED_PARAMETERS`: the feature maps of the learned-kernel
attention; P, the pack attention and the unpack attention of the nested one, whose query and output projections start
as BERT's); the teacher and everything else the conversion copied stay frozen. Each student layer is fed the teacher's
input of that layer, and the loss is the mean over layers of the mean squared error between the two attention outputs
(after the output projection, before the residual) over the real tokens, so the layers train independently (as in
LoLCATs); with `transfer_loss="attention_kl"` (learned kernel only) it is KL(teacher || student) of the attention
weights instead (Hedgehog). P still flows through the student's layers. Dropout is off in both models. The training
runs in transformers' `Trainer` (progress bar, seed, checkpoints when asked). docs/conversion.md.
"""

import tempfile
from dataclasses import dataclass, field

import datasets
import torch
from torch import nn
from transformers import DataCollatorWithPadding, Trainer, TrainingArguments, default_data_collator

from .conversion import is_transferred_parameter
from .modeling_luna import LunaModel, LunaPreTrainedModel

TRANSFER_LOSSES = ("output_mse", "attention_kl")
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class AttentionTransfer(nn.Module):
    """The frozen teacher and the student's encoder; `forward` returns the mean per-layer loss (`loss`) and the loss
    of each layer (`layer_losses`)."""

    def __init__(self, student: LunaModel, teacher: nn.Module, transfer_loss: str = "output_mse"):
        super().__init__()
        if transfer_loss not in TRANSFER_LOSSES:
            raise ValueError(f"transfer_loss must be one of {TRANSFER_LOSSES}, got {transfer_loss!r}.")
        if transfer_loss == "attention_kl" and student.config.attention_type != "learned_kernel":
            raise ValueError(
                "transfer_loss attention_kl needs the learned-kernel attention: nested Luna's tokens "
                "attend to P, not to each other, so there are no weights to compare with the teacher's."
            )
        self.student, self.transfer_loss = student, transfer_loss
        # Not a submodule: the Trainer's checkpoints then hold the student alone, and its optimizer never sees it.
        self.frozen_teacher = (teacher.eval().requires_grad_(False),)
        self.teacher_inputs = None  # the teacher's layer inputs, set per batch
        student_layers = student.layers
        teacher_layers = teacher.layers if hasattr(teacher, "layers") else teacher.encoder.layer  # ViT : BERT
        if len(student_layers) != len(teacher_layers):
            raise ValueError(f"The student has {len(student_layers)} layers, the teacher {len(teacher_layers)}.")
        self.teacher_outputs, self.student_outputs = [None] * len(teacher_layers), [None] * len(teacher_layers)
        self.hooks = []  # removed by `remove_hooks()`: afterwards both models compute as they did before
        for index, (student_layer, teacher_layer) in enumerate(zip(student_layers, teacher_layers, strict=True)):
            # BERT's attention output is its output projection's (`attention.output.dense`; ViT's
            # `attention.o_proj`), before dropout and the residual; Luna's is the learned-kernel attention's or the
            # unpack attention's first output.
            teacher_output = getattr(teacher_layer.attention, "o_proj", None) or teacher_layer.attention.output.dense
            if student.config.attention_type == "learned_kernel":
                student_attention = student_layer.attention
            else:
                student_attention = student_layer.unpack_attention
            self.hooks += [
                teacher_output.register_forward_hook(self.recorder(self.teacher_outputs, index)),
                student_layer.register_forward_pre_hook(self.teacher_input_feeder(index), with_kwargs=True),
                student_attention.register_forward_hook(self.recorder(self.student_outputs, index, returns_tuple=True)),
            ]

    def remove_hooks(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.teacher_inputs, self.teacher_outputs, self.student_outputs = None, [], []

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

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, pixel_values=None):
        """Texts (`input_ids`, `attention_mask`, `token_type_ids`) or images (`pixel_values`)."""
        if pixel_values is not None:
            teacher_inputs = student_inputs = {"pixel_values": pixel_values}
        else:
            teacher_inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
            if token_type_ids is not None:
                teacher_inputs["token_type_ids"] = token_type_ids
            student_inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
            if self.student.config.type_vocab_size > 0:
                student_inputs["token_type_ids"] = token_type_ids
        device = (input_ids if pixel_values is None else pixel_values).device
        teacher = self.frozen_teacher[0].to(device)
        weights = self.transfer_loss == "attention_kl"
        with torch.no_grad():
            teacher_outputs = teacher(**teacher_inputs, output_hidden_states=True, output_attentions=weights)
        self.teacher_inputs = teacher_outputs.hidden_states
        student_outputs = self.student(**student_inputs, output_attentions=weights)
        if pixel_values is None:
            real = attention_mask.bool()
        else:  # every image token is real: [CLS] and the patches
            real = torch.ones(student_outputs.last_hidden_state.shape[:2], dtype=torch.bool, device=device)
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


def freeze_all_but_new_attention(model: LunaPreTrainedModel) -> list[str]:
    """Train the parameters that the conversion added (nested Luna: and the unpack attention's query and output
    projections), nothing else; returns their names."""
    trained = []
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(is_transferred_parameter(name, model.config.attention_type))
        if parameter.requires_grad:
            trained.append(name)
    return trained


@dataclass
class AttentionTransferResult:
    """What `transfer_attention` did: the optimiser steps, the mean training loss, and per training batch the loss
    of each layer (`layer_losses[i][j]`: batch i, layer j)."""

    steps: int
    training_loss: float
    layer_losses: list[list[float]] = field(default_factory=list)
    trained_parameters: list[str] = field(default_factory=list)


def record_layer_losses(transfer: AttentionTransfer) -> list[list[float]]:
    """A list that receives each training batch's per-layer losses (the Trainer logs only their mean)."""
    history = []
    transfer.register_forward_hook(
        lambda module, args, output: history.append(output["layer_losses"].detach().float().cpu().tolist())
    )
    return history


def text_dataset(texts, tokenizer, max_length: int, text_column: str) -> datasets.Dataset:
    """Tokenized texts: a list of strings, or a `datasets.Dataset` with `text_column` (or already tokenized)."""
    if tokenizer is None:
        raise ValueError("Pass the tokenizer (the one convert_to_luna was given): it tokenizes and pads the texts.")
    if isinstance(texts, datasets.Dataset):
        if "input_ids" in texts.column_names:  # tokenized: the model's inputs only (a label column would reach it)
            return texts.select_columns([name for name in MODEL_INPUTS if name in texts.column_names])
        if text_column not in texts.column_names:
            raise ValueError(f"The dataset has no column {text_column!r}; its columns: {texts.column_names}.")
        texts = list(texts[text_column])
    texts = [text for text in texts if is_text(text)]
    if not texts:
        raise ValueError("No text to transfer the attention on: the texts are empty. Pass sentences or passages of "
                         "the lengths the model will read.")  # fmt: skip
    singles = [text for text in texts if isinstance(text, str)]
    pairs = [text for text in texts if not isinstance(text, str)]
    encoded = [tokenizer(singles, truncation=True, max_length=max_length)] if singles else []
    if pairs:  # read as the model reads a pair task: [SEP] between them, segment ids where the model has them
        first, second = [pair[0] for pair in pairs], [pair[1] for pair in pairs]
        encoded.append(tokenizer(first, second, truncation=True, max_length=max_length))
    columns = {name: [row for part in encoded for row in part[name]] for name in encoded[0]}
    return datasets.Dataset.from_dict(columns)  # the Trainer's sampler shuffles singles and pairs together


def image_dataset(images: torch.Tensor) -> list[dict]:
    """Unlabelled images, `pixel_values` as the model's image processor prepares them (batch, channels, h, w)."""
    if images.dim() != 4 or not images.is_floating_point() or images.shape[0] == 0:
        raise ValueError("Images for the transfer must be a non-empty float tensor (images, channels, height, width), "
                         f"as the image processor gives them; got {tuple(images.shape)}, {images.dtype}.")  # fmt: skip
    return [{"pixel_values": image} for image in images]


def is_text(text) -> bool:
    """A non-empty string, or a pair of non-empty strings."""
    if isinstance(text, str):
        return bool(text.strip())
    return isinstance(text, (tuple, list)) and len(text) == 2 and all(isinstance(part, str) and part.strip()
                                                                      for part in text)  # fmt: skip


# Imitating a few texts read over and over fits the new attention to them, not to the language: at most this many
# passes over the texts.
MAX_PASSES = 4


def check_enough_texts(count: int, training_args: TrainingArguments, noun: str = "texts") -> None:
    batch = training_args.per_device_train_batch_size
    if count < batch:
        raise ValueError(f"{count} {noun} are fewer than one batch of {batch}: give more {noun} (a few hundred at "
                         "least) or a smaller batch size.")  # fmt: skip
    read = training_args.max_steps * batch * training_args.gradient_accumulation_steps
    if read > MAX_PASSES * count:
        raise ValueError(
            f"{count} {noun} are too few for {training_args.max_steps} steps of {read // training_args.max_steps} "
            f"{noun}: each would be read {read / count:.0f} times (at most {MAX_PASSES}). Give at least "
            f"{-(-read // MAX_PASSES)} {noun}, or fewer steps (max_steps <= {MAX_PASSES * count // batch})."
        )


def transfer_attention(
    student: LunaPreTrainedModel,
    teacher: nn.Module,
    texts,
    tokenizer=None,
    *,
    transfer_loss: str = "output_mse",
    max_steps: int = 200,
    learning_rate: float = 1e-3,
    batch_size: int = 16,
    max_length: int = 128,
    seed: int = 0,
    text_column: str = "text",
    training_args: TrainingArguments | None = None,
    callbacks: list | None = None,
) -> AttentionTransferResult:
    """Train `student`'s new attention, in place, to imitate `teacher`'s (the model it was converted from, any head)
    on `texts`: a list of strings or `(first, second)` pairs (read as a pair task reads them), a `datasets.Dataset`
    (`text_column`, or already tokenized by `tokenizer`), or, for a converted ViT, a float tensor of unlabelled images
    (`pixel_values`, as its image processor prepares them; no tokenizer).

        student = convert_to_luna(teacher, tokenizer=tokenizer)
        result = transfer_attention(student, teacher, texts, tokenizer, max_steps=200)
        student.save_pretrained("my-luna"); tokenizer.save_pretrained("my-luna")

    The other arguments build the Trainer's `TrainingArguments` (AdamW, linear decay, no checkpoints); pass
    `training_args` instead for full control (checkpoints, resuming, logging). `callbacks` go to the Trainer. Raises a
    `ValueError` before any training for empty texts, fewer texts than one batch, or so few that each would be read
    more than `MAX_PASSES` times. Returns the steps, the mean loss and each batch's per-layer losses.
    """
    if getattr(student.config, "kernel_feature_map", "learned") != "learned":
        feature_map = student.config.kernel_feature_map
        raise ValueError(f"This model's attention has nothing new to train (the fixed feature map {feature_map!r}): "
                         "finetune it directly, without a transfer.")  # fmt: skip
    if isinstance(texts, torch.Tensor):
        dataset, collator = image_dataset(texts), default_data_collator
    else:
        dataset, collator = text_dataset(texts, tokenizer, max_length, text_column), DataCollatorWithPadding(tokenizer)
    if training_args is None:
        training_args = TrainingArguments(
            output_dir=tempfile.mkdtemp(prefix="luna-transfer-"), max_steps=max_steps, learning_rate=learning_rate,
            per_device_train_batch_size=batch_size, seed=seed, save_strategy="no", report_to=[],
            logging_steps=max(1, max_steps // 20),
        )  # fmt: skip
    check_enough_texts(len(dataset), training_args, "images" if isinstance(texts, torch.Tensor) else "texts")
    trainable = {name: parameter.requires_grad for name, parameter in student.named_parameters()}
    trained = freeze_all_but_new_attention(student)
    transfer = AttentionTransfer(student.base_model, getattr(teacher, "base_model", teacher), transfer_loss)
    layer_losses = record_layer_losses(transfer)
    training_args.remove_unused_columns = False
    trainer = Trainer(model=transfer, args=training_args, train_dataset=dataset,
                      data_collator=collator, callbacks=callbacks)  # fmt: skip
    try:
        output = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    finally:  # the student is left as an ordinary model: no hooks, its parameters as trainable as they were
        transfer.remove_hooks()
        for name, parameter in student.named_parameters():
            parameter.requires_grad_(trainable[name])
    student.eval()
    return AttentionTransferResult(output.global_step, output.training_loss, layer_losses, trained)


__all__ = ["AttentionTransfer", "AttentionTransferResult", "attention_kl", "transfer_attention"]

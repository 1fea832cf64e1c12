#!/usr/bin/env python
"""Convert the authors' fairseq Luna checkpoints (fairseq-apollo `luna_bert`, and the translation model `luna`) into
a luna-hf model folder.

    python scripts/convert_fairseq_luna_to_hf.py --fairseq_checkpoint luna.base.tied/model.pt \
        --output_dir luna-base-tied --dict luna.base.tied/dict.txt \
        --bpe_encoder_json encoder.json --bpe_vocab vocab.bpe

Reads `model.pt` (weights under "model", training arguments under "args" or "cfg"), builds the matching
`LunaConfig`, maps every tensor to luna-hf's names and saves a `save_pretrained` folder (safetensors + remote code).
A checkpoint with a classification head becomes `LunaForSequenceClassification` (or `LunaForMultipleChoice` for
fairseq's sentence_ranking task); a masked_lm checkpoint, or one without heads, becomes `LunaForMaskedLM`. With
`--dict` the fairseq dictionary and GPT-2's BPE files become a RoBERTa-style tokenizer with the fairseq ids. A
translation checkpoint (task `translation`, archs `luna`, `luna_base_tied`, `luna_base_untied`) becomes
`LunaForConditionalGeneration` with a `LunaSeq2SeqConfig` (model only; its dictionaries are not converted). Any
unread source tensor, unfilled target, or inconsistent argument is an error, and nothing is written to
`--output_dir` unless the whole conversion succeeded and the saved folder reloads to the same tensors. See
docs/conversion.md.
"""

import argparse
import collections
import importlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from tokenizers import AddedToken
from tqdm.auto import tqdm
from transformers import HfArgumentParser, RobertaTokenizer

from luna_hf import (
    LunaConfig,
    LunaForConditionalGeneration,
    LunaForMaskedLM,
    LunaForMultipleChoice,
    LunaForSequenceClassification,
    LunaSeq2SeqConfig,
)
from luna_hf.model_card import write_model_card

logger = logging.getLogger("convert_fairseq_luna")

ENCODER = "encoder.sentence_encoder."
PAD_INDEX = 1  # fairseq Dictionary: <s>=0 <pad>=1 </s>=2 <unk>=3
SPECIAL_SYMBOLS = ["<s>", "<pad>", "</s>", "<unk>"]

# `luna_bert`'s base_architecture defaults and its named architectures (fairseq/models/luna_bert/model.py); they
# fill arguments missing from the checkpoint exactly as fairseq would when it rebuilds the model.
DEFAULT_ARGS = dict(
    encoder_layers=12, encoder_embed_dim=768, encoder_ffn_embed_dim=3072, encoder_attention_heads=12,
    max_positions=512, projection_length=128, fix_projection_length=False, untie_luna_kv=False,
    activation_fn="gelu", pooler_activation_fn="tanh", dropout=0.1, attention_dropout=0.1,
    activation_dropout=0.0, pooler_dropout=0.0, untie_weights_luna=False,
)  # fmt: skip
LARGE = dict(encoder_layers=24, encoder_embed_dim=1024, encoder_ffn_embed_dim=4096, encoder_attention_heads=16)
LUNA_BERT_ARCHS = {
    "luna_bert": {},
    "luna_base_512": {},
    "luna_base_tied_512": {"untie_luna_kv": False},
    "luna_base_untied_512": {"untie_luna_kv": True},
    "luna_base_2048": {"max_positions": 2048, "projection_length": 256},
    "luna_large_512": LARGE,
    "luna_large_2048": {**LARGE, "projection_length": 256},
}
# fairseq activation names -> transformers ACT2FN names (fairseq "gelu" is the exact erf GELU).
ACTIVATIONS = {"gelu": "gelu", "gelu_accurate": "gelu_new", "gelu_fast": "gelu_new", "relu": "relu",
               "tanh": "tanh", "linear": "linear"}  # fmt: skip

# fairseq module -> luna-hf module, inside encoder.sentence_encoder.layers.{i}. / luna.layers.{i}.
LAYER_MODULES = {
    "self_attn.pq_proj": "pack_attention.q_proj",
    "self_attn.pc_proj": "pack_attention.kv_proj",  # tied: one projection is the pack key and value
    "self_attn.pk_proj": "pack_attention.k_proj",
    "self_attn.pv_proj": "pack_attention.v_proj",
    "self_attn.q_proj": "unpack_attention.q_proj",
    "self_attn.c_proj": "unpack_attention.kv_proj",  # tied: one projection is the unpack key and value
    "self_attn.k_proj": "unpack_attention.k_proj",
    "self_attn.v_proj": "unpack_attention.v_proj",
    "self_attn.out_proj": "unpack_attention.o_proj",
    "self_attn_layer_norm": "attention_layer_norm",
    "self_atten_proj_layer_norm": "packed_layer_norm",  # sic: "atten"
    "fc1": "fc1",
    "fc2": "fc2",
    "final_layer_norm": "ffn_layer_norm",
}
RENAMES = [
    (r"encoder\.sentence_encoder\.embed_tokens\.weight", "luna.embeddings.word_embeddings.weight"),
    (r"encoder\.sentence_encoder\.embed_positions\.weight", "luna.embeddings.position_embeddings.weight"),
    (r"encoder\.sentence_encoder\.emb_layer_norm\.(weight|bias)", r"luna.embeddings.layer_norm.\1"),
    (r"encoder\.sentence_encoder\.projected_embeddings", "luna.embeddings.projected_embeddings"),
    (r"encoder\.sentence_encoder\.proj_emb_layer_norm\.(weight|bias)", r"luna.embeddings.projected_layer_norm.\1"),
    *[
        (
            rf"encoder\.sentence_encoder\.layers\.(\d+)\.{re.escape(source)}\.(weight|bias)",
            rf"luna.layers.\1.{target}.\2",
        )
        for source, target in LAYER_MODULES.items()
    ],
    (r"encoder\.lm_head\.(dense|layer_norm)\.(weight|bias)", r"lm_head.\1.\2"),
    (r"encoder\.lm_head\.bias", "lm_head.decoder.bias"),
    (r"encoder\.lm_head\.weight", "lm_head.decoder.weight"),
    (r"classification_heads\.[^.]+\.(dense|out_proj)\.(weight|bias)", r"classifier.\1.\2"),
    (r"classification_heads\.pooling_classification_head\.in_proj\.(weight|bias)", r"classifier.pooler.in_proj.\1"),
    # q, k, v: concatenated into nn.MultiheadAttention's in_proj_{weight,bias} by `convert_state_dict`.
    (
        r"classification_heads\.attention_classification_head\.attn\.(\w+)\.(weight|bias)",
        r"classifier.pooler.attention.\1.\2",
    ),
    (
        r"classification_heads\.attention_classification_head\.layernorm\.(weight|bias)",
        r"classifier.pooler.layer_norm.\1",
    ),
]
# luna_bert picks a head's kind by its name (any other name is the [CLS] head): its classifier_pooling and tensors.
HEAD_POOLINGS = {"pooling_classification_head": "packed_max", "attention_classification_head": "packed_attention"}
HEAD_MODULES = {
    "cls": ["dense", "out_proj"],
    "packed_max": ["in_proj", "dense", "out_proj"],
    "packed_attention": [f"attn.{name}_proj" for name in ("q", "k", "v", "out")] + ["layernorm", "dense", "out_proj"],
}
HEAD_CLASSES = {
    "masked_lm": LunaForMaskedLM,
    "sequence_classification": LunaForSequenceClassification,
    "multiple_choice": LunaForMultipleChoice,
}


# The translation model `luna` (fairseq/models/luna.py): base_architecture's defaults and its named architectures.
MT_DEFAULT_ARGS = dict(
    encoder_embed_dim=512, encoder_ffn_embed_dim=2048, encoder_layers=6, encoder_attention_heads=8,
    encoder_learned_pos=False, encoder_normalize_before=False, decoder_layers=6, decoder_learned_pos=False,
    decoder_normalize_before=False, projection_length=32, fix_projection_length=False, untie_luna_kv=False,
    attention_dropout=0.0, activation_dropout=0.0, activation_fn="relu", dropout=0.1, word_dropout=0.0,
    layernorm_embedding=False, share_all_embeddings=False, share_decoder_input_output_embed=False,
    no_token_positional_embeddings=False, no_scale_embedding=False, adaptive_softmax_cutoff=None,
    max_source_positions=1024, max_target_positions=1024,
)  # fmt: skip
LUNA_MT_ARCHS = {"luna": {}, "luna_base": {}, "luna_base_tied": {}, "luna_base_untied": {"untie_luna_kv": True}}
# fairseq module -> luna-hf module inside decoder.layers.{i}. (the cross-attention's are LAYER_MODULES' self_attn.*)
DECODER_LAYER_MODULES = {
    "self_attn.pq_proj": "self_attention.pack_query_proj",
    "self_attn.pc_proj": "self_attention.pack_key_proj",
    "self_attn.q_proj": "self_attention.q_proj",
    "self_attn.c_proj": "self_attention.kv_proj",
    "self_attn.k_proj": "self_attention.k_proj",
    "self_attn.v_proj": "self_attention.v_proj",
    "self_attn.out_proj": "self_attention.o_proj",
    "self_attn_layer_norm": "self_attention_layer_norm",
    **{
        source.replace("self_attn.", "encoder_attn."): "cross_attention." + target
        for source, target in LAYER_MODULES.items()
        if source.startswith("self_attn.")
    },
    "encoder_attn_layer_norm": "cross_attention_layer_norm",
    "encoder_atten_proj_layer_norm": "cross_attention_packed_layer_norm",  # sic: "atten"
    "fc1": "fc1",
    "fc2": "fc2",
    "final_layer_norm": "ffn_layer_norm",
}
MT_RENAMES = [
    (r"(encoder|decoder)\.embed_tokens\.weight", r"model.\1.embed_tokens.weight"),
    (r"(encoder|decoder)\.embed_positions\.weight", r"model.\1.embed_positions.embeddings.weight"),
    (r"encoder\.projected_embeddings", "model.encoder.projected_embeddings"),
    (r"(encoder|decoder)\.layer_norm\.(weight|bias)", r"model.\1.layer_norm.\2"),
    (r"encoder\.proj_layer_norm\.(weight|bias)", r"model.encoder.packed_layer_norm.\1"),
    (r"decoder\.output_projection\.weight", "lm_head.weight"),
    *[
        (rf"encoder\.layers\.(\d+)\.{re.escape(source)}\.(weight|bias)", rf"model.encoder.layers.\1.{target}.\2")
        for source, target in LAYER_MODULES.items()
    ],
    *[
        (rf"decoder\.layers\.(\d+)\.{re.escape(source)}\.(weight|bias)", rf"model.decoder.layers.\1.{target}.\2")
        for source, target in DECODER_LAYER_MODULES.items()
    ],
]
# Buffers the model recomputes (sinusoids, versions) and the decoder's final P LayerNorm, which no output reads.
MT_SET_ASIDE = (
    r"(encoder|decoder)\.(version|embed_positions\._float_tensor|projected_positions)|decoder\.proj_layer_norm\..*"
)


class ConversionError(ValueError):
    """A checkpoint or an argument that cannot be converted exactly; the message says why and what to do."""


@dataclass
class Arguments:
    fairseq_checkpoint: str = field(metadata={"help": "The fairseq checkpoint (`model.pt`) of a luna_bert model."})
    output_dir: str = field(metadata={"help": "Where to write the converted model (must be new or empty)."})
    dict: str | None = field(
        default=None, metadata={"help": "fairseq `dict.txt` of the checkpoint: also convert the tokenizer."}
    )
    bpe_encoder_json: str | None = field(default=None, metadata={"help": "GPT-2 BPE `encoder.json` (with --dict)."})
    bpe_vocab: str | None = field(default=None, metadata={"help": "GPT-2 BPE merges `vocab.bpe` (with --dict)."})
    head: Literal["auto", "masked_lm", "sequence_classification", "multiple_choice"] = field(
        default="auto",
        metadata={
            "help": "Model to build. auto: the masked-LM head for a masked_lm (pretraining) checkpoint, else the "
            "checkpoint's classification head if it has one (multiple choice for fairseq's sentence_ranking task), "
            "else the masked-LM head."
        },
    )
    classification_head: str | None = field(
        default=None, metadata={"help": "Name of the fairseq classification head to convert, if there are several."}
    )
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace a non-empty --output_dir."})
    push_to_hub: str | None = field(default=None, metadata={"help": "Also upload the folder to this Hub repo."})
    trust_pickle: bool = field(
        default=False,
        metadata={
            "help": "If the safe (weights-only) load cannot read the training arguments, unpickle the whole file. "
            "This can run arbitrary code: only for files from a source you trust."
        },
    )


# ---------------------------------------------------------------------------------------------------------------
# Reading the checkpoint


class _Placeholder:
    """Stands in for objects outside the weights and arguments (e.g. fairseq's training meters in `extra_state`)
    whose classes a weights-only load may not build. It runs no code from the file and keeps nothing."""

    def __new__(cls, *args, **kwargs):
        return collections.OrderedDict()  # the weights-only unpickler fills only exact dicts with SETITEM(S)


def _numpy_globals(names):
    """numpy scalars (e.g. a saved validation loss) are data, not code: allow them as torch's documentation shows."""
    import numpy as np

    allowed = [getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith("DType")]
    for name in names:
        module, _, attribute = name.rpartition(".")
        allowed.append((getattr(importlib.import_module(module), attribute), name))
    return allowed


def load_checkpoint(path: str, trust_pickle: bool = False) -> dict:
    """`torch.load` with `weights_only=True` and `argparse.Namespace` allowed; see the module docstring."""
    if not os.path.isfile(path):
        raise ConversionError(f"--fairseq_checkpoint {path!r} is not a file.")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # the file decides which error torch raises
        first_error = error
    if "Weights only load failed" not in str(first_error):
        raise ConversionError(
            f"Could not read {path!r} as a PyTorch checkpoint ({type(first_error).__name__}: "
            f"{str(first_error).splitlines()[0]}). Is the file complete (not truncated by an interrupted download)?"
        ) from first_error
    # Objects of other classes (fairseq stores training meters in `extra_state`): retry with inert placeholders.
    try:
        unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(path)) - {"argparse.Namespace"}
        numpy_names = {name for name in unsafe if name.startswith("numpy.")}
        allowed = [argparse.Namespace, *_numpy_globals(numpy_names)]
        allowed += [(_Placeholder, name) for name in sorted(unsafe - numpy_names)]
        with torch.serialization.safe_globals(allowed):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        skipped = sorted(unsafe - numpy_names)
        if not skipped or _arguments_readable(checkpoint):
            if skipped:
                logger.info("Skipped objects of %s (training state, not needed).", skipped)
            return checkpoint
        reason = f"its training arguments are objects of classes among {skipped}"
    except Exception as error:
        reason = f"a weights-only load fails: {str(error).splitlines()[-1]}"
    if not trust_pickle:
        raise ConversionError(
            f"{path!r} cannot be read safely: {reason}. If you trust the file's source, rerun with --trust_pickle "
            "to unpickle it completely (this can execute code stored in the file; the classes it names must be "
            "importable, e.g. fairseq or omegaconf installed)."
        )
    logger.warning("--trust_pickle: unpickling %s completely (%s).", path, reason)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise ConversionError(f"Full unpickling of {path!r} failed too: {type(error).__name__}: {error}") from error


def _arguments_readable(checkpoint) -> bool:
    try:
        fairseq_arguments(checkpoint)
    except ConversionError:
        return False
    return True


def fairseq_arguments(checkpoint) -> dict:
    """The model arguments as a dict, from `args` (argparse.Namespace) or `cfg["model"]` (dict or Namespace)."""
    if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get("model"), Mapping):
        raise ConversionError("Not a fairseq checkpoint: expected a dict with the model's state dict under 'model'.")
    args, cfg = checkpoint.get("args"), checkpoint.get("cfg")
    if args is None and isinstance(cfg, Mapping):
        args = cfg.get("model")
    if isinstance(args, argparse.Namespace):
        return dict(vars(args))
    if isinstance(args, Mapping) and args:
        values = dict(args)
        values.setdefault("arch", values.get("_name"))  # fairseq's dataclass configs name the arch `_name`
        return values
    raise ConversionError(
        "The checkpoint has no readable training arguments: expected an argparse.Namespace under 'args' or a "
        f"dict under cfg['model'], got {type(args).__name__}."
    )


def fairseq_task(checkpoint) -> str | None:
    """The training task: `cfg["task"]["_name"]` (newer fairseq) or `args.task`."""
    cfg = checkpoint.get("cfg")
    task = cfg.get("task") if isinstance(cfg, Mapping) else None
    if isinstance(task, Mapping) and task.get("_name"):
        return task["_name"]
    return fairseq_arguments(checkpoint).get("task")


# ---------------------------------------------------------------------------------------------------------------
# Configuration


def luna_config(checkpoint: dict, head: str, head_name: str | None) -> LunaConfig:
    """`LunaConfig` from the arguments, checked against the tensor shapes and luna_bert's fixed design."""
    args = fairseq_arguments(checkpoint)
    state = checkpoint["model"]
    arch = args.get("arch")
    if arch not in LUNA_BERT_ARCHS and ENCODER + "projected_embeddings" not in state:
        kind = "another Luna model (LRA)" if str(arch).startswith("luna") else "not a Luna model"
        raise ConversionError(
            f"This checkpoint (arch {arch!r}) is {kind}: only fairseq-apollo's luna_bert (archs "
            f"{sorted(LUNA_BERT_ARCHS)}) and translation model (archs {sorted(LUNA_MT_ARCHS)}, task translation) "
            f"convert to luna-hf. It has no '{ENCODER}projected_embeddings'; its first keys are {list(state)[:5]}."
        )
    args = {**DEFAULT_ARGS, **LUNA_BERT_ARCHS.get(arch, {}), **{k: v for k, v in args.items() if v is not None}}

    def tensor(name):
        if name not in state:
            raise ConversionError(f"Missing tensor {name!r}: the checkpoint is incomplete.")
        return state[name]

    # luna_bert hard-wires post-LN, embedding LayerNorms, learned positions and no segment embeddings.
    wrong = {
        f"{ENCODER}layer_norm.weight": "a final LayerNorm (pre-LN, normalize_before=True)",
        f"{ENCODER}segment_embeddings.weight": "segment embeddings",
        f"{ENCODER}embed_positions._float_tensor": "sinusoidal positions",
    }
    for name, what in wrong.items():
        if name in state:
            raise ConversionError(f"The checkpoint has {what} ({name!r}); luna_bert and luna-hf have none.")
    if f"{ENCODER}emb_layer_norm.weight" not in state:
        raise ConversionError(f"No embedding LayerNorm ({ENCODER}emb_layer_norm.weight), which luna_bert always has.")

    vocab_size, hidden_size = tensor(f"{ENCODER}embed_tokens.weight").shape
    projected_length = tensor(f"{ENCODER}projected_embeddings").shape[0]
    positions = tensor(f"{ENCODER}embed_positions.weight").shape[0]
    intermediate_size = tensor(f"{ENCODER}layers.0.fc1.weight").shape[0]
    layer_ids = {int(m.group(1)) for k in state if (m := re.match(re.escape(ENCODER) + r"layers\.(\d+)\.", k))}
    if layer_ids != set(range(len(layer_ids))):
        raise ConversionError(f"Layer indices {sorted(layer_ids)} are not 0..N-1.")
    tied_key_value = f"{ENCODER}layers.0.self_attn.pc_proj.weight" in state
    tied_output = (
        "encoder.lm_head.weight" not in state
        or state["encoder.lm_head.weight"] is state.get(f"{ENCODER}embed_tokens.weight")
        or torch.equal(state["encoder.lm_head.weight"], state[f"{ENCODER}embed_tokens.weight"])
    )

    checks = {
        "encoder_layers": (args["encoder_layers"], len(layer_ids)),
        "encoder_embed_dim": (args["encoder_embed_dim"], hidden_size),
        "encoder_ffn_embed_dim": (args["encoder_ffn_embed_dim"], intermediate_size),
        "projection_length": (args["projection_length"], projected_length),
        "max_positions": (args["max_positions"] + PAD_INDEX + 1, positions),
        "untie_luna_kv": (bool(args["untie_luna_kv"]), not tied_key_value),
        "untie_weights_luna": (bool(args["untie_weights_luna"]), not tied_output),
    }
    mismatched = {name: values for name, values in checks.items() if values[0] != values[1]}
    if mismatched:
        raise ConversionError(
            "The arguments disagree with the tensors (argument-implied value, tensor-implied value): "
            + ", ".join(f"{name} {a} vs {b}" for name, (a, b) in mismatched.items())
        )
    if args["activation_fn"] not in ACTIVATIONS:
        raise ConversionError(f"Unknown activation_fn {args['activation_fn']!r}; known: {sorted(ACTIVATIONS)}.")
    if head == "masked_lm" and args["activation_fn"] != "gelu":
        raise ConversionError(
            f"The fairseq LM head applies activation_fn ({args['activation_fn']!r}); luna-hf's LM head applies the "
            "exact GELU, so the masked-LM outputs could not be equal. Convert a classification head instead."
        )
    if head != "masked_lm" and args["pooler_activation_fn"] != "tanh":
        raise ConversionError(
            f"The classification head uses pooler_activation_fn {args['pooler_activation_fn']!r}; luna-hf's head "
            "applies tanh."
        )

    extra = {}
    if head != "masked_lm":
        out_proj = tensor(f"classification_heads.{head_name}.out_proj.weight")
        if head == "multiple_choice" and out_proj.shape[0] != 1:
            raise ConversionError(f"A multiple-choice head scores each choice with 1 output, {head_name!r} has "
                                  f"{out_proj.shape[0]}.")  # fmt: skip
        if head == "sequence_classification":
            extra["num_labels"] = out_proj.shape[0]
            if args.get("regression_target"):
                extra["problem_type"] = "regression"
    return LunaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=len(layer_ids),
        num_attention_heads=args["encoder_attention_heads"],
        intermediate_size=intermediate_size,
        hidden_act=ACTIVATIONS[args["activation_fn"]],
        hidden_dropout_prob=args["dropout"],
        attention_probs_dropout_prob=args["attention_dropout"],
        activation_dropout=args["activation_dropout"],
        classifier_dropout=args["pooler_dropout"],
        max_position_embeddings=positions,
        layer_norm_eps=1e-5,
        pad_token_id=PAD_INDEX,
        bos_token_id=0,
        eos_token_id=2,
        projected_length=projected_length,
        tie_key_value=tied_key_value,
        dynamic_projection=not args["fix_projection_length"],
        classifier_pooling=HEAD_POOLINGS.get(head_name, "cls"),
        tie_word_embeddings=tied_output,
        **extra,
    )


def choose_head(checkpoint: dict, head: str, head_name: str | None) -> tuple[str, str | None]:
    """Which luna-hf class to build and which fairseq classification head feeds it."""
    names = sorted({key.split(".")[1] for key in checkpoint["model"] if key.startswith("classification_heads.")})
    if head_name is not None and head_name not in names:
        raise ConversionError(f"No classification head {head_name!r} in the checkpoint; it has {names}.")
    task = fairseq_task(checkpoint)
    if head == "masked_lm" or (head == "auto" and head_name is None and task == "masked_lm"):
        return "masked_lm", None  # a pretraining checkpoint's registered heads are left out
    if head_name is None:
        if not names:
            if head == "auto":
                return "masked_lm", None
            raise ConversionError(f"--head {head} needs a classification head; the checkpoint has none.")
        if len(names) > 1:
            raise ConversionError(f"The checkpoint has several classification heads {names}: pick one with "
                                  "--classification_head.")  # fmt: skip
        head_name = names[0]
    prefix = f"classification_heads.{head_name}."
    pooling = HEAD_POOLINGS.get(head_name, "cls")
    known = {f"{prefix}{module}.{kind}" for module in HEAD_MODULES[pooling] for kind in ("weight", "bias")}
    unknown = [k for k in checkpoint["model"] if k.startswith(prefix) and k not in known]
    if unknown:
        raise ConversionError(
            f"Head {head_name!r} has tensors {unknown[:4]} that fairseq-apollo's head of that name (classifier_pooling "
            f"{pooling!r}) does not have; the heads luna-hf converts are the [CLS] head, 'pooling_classification_head' "
            "and 'attention_classification_head'."
        )
    if head == "auto":
        head = "multiple_choice" if task == "sentence_ranking" else "sequence_classification"
    return head, head_name


# ---------------------------------------------------------------------------------------------------------------
# Weights


def convert_state_dict(checkpoint: dict, model, head_name: str | None) -> dict[str, torch.Tensor]:
    """fairseq tensors under luna-hf names; every tensor of the checkpoint is used or deliberately set aside."""
    state, config = checkpoint["model"], model.config
    converted, leftover, set_aside = {}, [], []
    for key, value in tqdm(state.items(), desc="Mapping tensors", unit=" tensors", leave=False):
        if key.startswith("classification_heads.") and key.split(".")[1] != head_name:
            set_aside.append(key)  # another task's head, or heads while converting the masked LM
            continue
        if key.startswith("encoder.lm_head.") and not isinstance(model, LunaForMaskedLM):
            set_aside.append(key)  # fine-tuned checkpoints keep the pretraining LM head
            continue
        if key == "encoder.lm_head.weight" and config.tie_word_embeddings:
            continue  # the same tensor as embed_tokens (checked in luna_config)
        target = next((re.sub(pattern, to, key) for pattern, to in RENAMES if re.fullmatch(pattern, key)), None)
        if target is None:
            leftover.append(key)
            continue
        converted[target] = value
    # nn.MultiheadAttention keeps the query, key and value projections in one tensor, in that order.
    for kind in ("weight", "bias"):
        parts = [converted.pop(f"classifier.pooler.attention.{name}_proj.{kind}", None) for name in ("q", "k", "v")]
        if all(part is not None for part in parts):
            converted[f"classifier.pooler.attention.in_proj_{kind}"] = torch.cat(parts)
    if set_aside:
        groups = sorted({".".join(k.split(".")[:2]) for k in set_aside})
        logger.warning("Not converted (not part of a %s): %s", type(model).__name__, groups)

    check_exact_mapping(model, converted, leftover)
    return converted


def check_exact_mapping(model, converted: dict, leftover: list[str]) -> None:
    """Every source tensor used (`leftover` lists those that were not) and every model tensor filled, in its shape."""
    expected = model.state_dict()
    tied = set(model.all_tied_weights_keys)
    missing = sorted(set(expected) - tied - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    shapes = sorted(
        f"{k}: {tuple(converted[k].shape)} vs {tuple(expected[k].shape)}"
        for k in set(converted) & set(expected)
        if converted[k].shape != expected[k].shape
    )
    problems = []
    if leftover:
        problems.append(f"source tensors with no luna-hf counterpart: {leftover}")
    if missing:
        problems.append(f"luna-hf tensors the checkpoint does not provide: {missing}")
    if unexpected:
        problems.append(f"tensors that do not fit this configuration: {unexpected}")
    if shapes:
        problems.append(f"shape mismatches (checkpoint vs model): {shapes}")
    if problems:
        raise ConversionError("The checkpoint does not map exactly onto luna-hf: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------------------------
# The translation model (`luna`, --task translation)


def is_translation(checkpoint) -> bool:
    """The task decides (a masked-LM checkpoint may carry an arch name that is also a translation arch's); without a
    task the arch; without either, the tensors (a translation model has decoder layers)."""
    task, arch = fairseq_task(checkpoint), fairseq_arguments(checkpoint).get("arch")
    if task:
        return task.startswith("translation")
    if arch:
        return arch in LUNA_MT_ARCHS
    return any(name.startswith("decoder.layers.") for name in checkpoint.get("model", {}))


def translation_config(checkpoint: dict) -> LunaSeq2SeqConfig:
    """`LunaSeq2SeqConfig` from the arguments of a `luna` translation checkpoint, checked against its tensors."""
    args, state = fairseq_arguments(checkpoint), checkpoint["model"]
    arch = args.get("arch")
    if arch not in LUNA_MT_ARCHS:
        raise ConversionError(
            f"Translation arch {arch!r} is not fairseq-apollo's Luna; known: {sorted(LUNA_MT_ARCHS)}."
        )
    args = {**MT_DEFAULT_ARGS, **LUNA_MT_ARCHS[arch], **{k: v for k, v in args.items() if v is not None}}
    for name in ("decoder_embed_dim", "decoder_ffn_embed_dim", "decoder_attention_heads"):
        args.setdefault(name, args[name.replace("decoder", "encoder")])
    for side in ("encoder", "decoder"):
        args.setdefault(f"{side}_projected_attention_heads", args[f"{side}_attention_heads"])
    unsupported = {
        "--layernorm-embedding": args["layernorm_embedding"],
        "--no-token-positional-embeddings": args["no_token_positional_embeddings"],
        "--adaptive-softmax-cutoff": args["adaptive_softmax_cutoff"] is not None,
        "--share-decoder-input-output-embed without --share-all-embeddings": (
            args["share_decoder_input_output_embed"] and not args["share_all_embeddings"]
        ),
        "different encoder and decoder --*-normalize-before": (
            args["encoder_normalize_before"] != args["decoder_normalize_before"]
        ),
        "different encoder and decoder --*-learned-pos": args["encoder_learned_pos"] != args["decoder_learned_pos"],
        "different encoder and decoder sizes or heads": any(
            args[f"encoder_{name}"] != args[f"decoder_{name}"]
            for name in ("embed_dim", "ffn_embed_dim", "attention_heads")
        ),
        "projected heads different from the heads": any(
            args[f"{side}_projected_attention_heads"] != args[f"{side}_attention_heads"]
            for side in ("encoder", "decoder")
        ),
    }
    if any(unsupported.values()):
        raise ConversionError(
            f"The checkpoint uses {[name for name, used in unsupported.items() if used]}, which "
            "LunaForConditionalGeneration does not implement."
        )
    if args["activation_fn"] not in ACTIVATIONS:
        raise ConversionError(f"Unknown activation_fn {args['activation_fn']!r}; known: {sorted(ACTIVATIONS)}.")

    def tensor(name):
        if name not in state:
            raise ConversionError(f"Missing tensor {name!r}: the checkpoint is incomplete.")
        return state[name]

    vocab_size, hidden_size = tensor("encoder.embed_tokens.weight").shape
    layers = {
        side: len({k.split(".")[2] for k in state if k.startswith(f"{side}.layers.")})
        for side in ("encoder", "decoder")
    }
    shared = all(
        torch.equal(tensor("encoder.embed_tokens.weight"), tensor(name))
        for name in ("decoder.embed_tokens.weight", "decoder.output_projection.weight")
    )
    checks = {
        "encoder_embed_dim": (args["encoder_embed_dim"], hidden_size),
        "encoder_layers": (args["encoder_layers"], layers["encoder"]),
        "decoder_layers": (args["decoder_layers"], layers["decoder"]),
        "encoder_ffn_embed_dim": (args["encoder_ffn_embed_dim"], tensor("encoder.layers.0.fc1.weight").shape[0]),
        "projection_length": (args["projection_length"], tensor("encoder.projected_embeddings").shape[0]),
        "untie_luna_kv": (bool(args["untie_luna_kv"]), "encoder.layers.0.self_attn.pc_proj.weight" not in state),
        "share_all_embeddings": (bool(args["share_all_embeddings"]), shared),
    }
    max_positions = min(args["max_source_positions"], args["max_target_positions"])
    if args["encoder_learned_pos"]:
        rows = {tensor(f"{side}.embed_positions.weight").shape[0] for side in ("encoder", "decoder")}
        checks["max_source_positions"] = (args["max_source_positions"] + PAD_INDEX + 1, max(rows))
        checks["max_target_positions"] = (args["max_target_positions"] + PAD_INDEX + 1, min(rows))
    mismatched = {name: values for name, values in checks.items() if values[0] != values[1]}
    if mismatched:
        raise ConversionError(
            "The arguments disagree with the tensors (argument-implied value, tensor-implied value): "
            + ", ".join(f"{name} {a} vs {b}" for name, (a, b) in mismatched.items())
        )
    return LunaSeq2SeqConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        encoder_layers=layers["encoder"],
        decoder_layers=layers["decoder"],
        num_attention_heads=args["encoder_attention_heads"],
        intermediate_size=args["encoder_ffn_embed_dim"],
        hidden_act=ACTIVATIONS[args["activation_fn"]],
        hidden_dropout_prob=args["dropout"],
        attention_probs_dropout_prob=args["attention_dropout"],
        activation_dropout=args["activation_dropout"],
        max_position_embeddings=max_positions,
        projected_length=args["projection_length"],
        dynamic_projection=not args["fix_projection_length"],
        tie_key_value=not args["untie_luna_kv"],
        normalize_before=bool(args["encoder_normalize_before"]),
        position_embedding_type="learned" if args["encoder_learned_pos"] else "sinusoidal",
        scale_embedding=not args["no_scale_embedding"],
        tie_word_embeddings=shared,
        pad_token_id=PAD_INDEX,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
    )


def convert_translation_state_dict(checkpoint: dict, model: LunaForConditionalGeneration) -> dict[str, torch.Tensor]:
    """fairseq tensors of a `luna` translation model under luna-hf names; buffers the model recomputes are skipped."""
    converted, leftover = {}, []
    tied = set(model.all_tied_weights_keys)
    for key, value in checkpoint["model"].items():
        if re.fullmatch(MT_SET_ASIDE, key):
            continue
        target = next((re.sub(pattern, to, key) for pattern, to in MT_RENAMES if re.fullmatch(pattern, key)), None)
        if target is None:
            leftover.append(key)
        elif target not in tied:  # the shared embeddings are equal (checked in translation_config)
            converted[target] = value
    check_exact_mapping(model, converted, leftover)
    return converted


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer


def read_fairseq_dictionary(path: str) -> list[str]:
    """Symbols of a fairseq `dict.txt` ("<symbol> <count> [#fairseq:overwrite]" per line), in index order."""
    symbols, seen = list(SPECIAL_SYMBOLS), set(SPECIAL_SYMBOLS)
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        symbol, _, count = line.rstrip().rpartition(" ")
        overwrite = count == "#fairseq:overwrite"
        if overwrite:
            symbol, _, count = symbol.rpartition(" ")
        if not symbol or not count.lstrip("-").isdigit():
            raise ConversionError(f"{path}:{number}: expected '<symbol> <count>', got {line!r}.")
        if symbol in seen and not overwrite:
            raise ConversionError(f"{path}:{number}: duplicate symbol {symbol!r} (fairseq refuses it too).")
        seen.add(symbol)
        symbols.append(symbol)
    return symbols


def build_tokenizer(dict_path: str, encoder_json: str, vocab_bpe: str, vocab_size: int, max_length: int):
    """RoBERTa's tokenizer over fairseq ids: GPT-2 BPE token -> GPT-2 id -> fairseq index (dict.txt), + <mask>."""
    symbols = read_fairseq_dictionary(dict_path) + ["<mask>"]  # fairseq's masked_lm task appends <mask>
    if len(symbols) != vocab_size:
        raise ConversionError(
            f"{dict_path} gives {len(symbols)} symbols (4 special + {len(symbols) - 5} lines + <mask>), but the "
            f"checkpoint's embedding has {vocab_size} rows: it is not this model's dictionary."
        )
    gpt2_tokens = {gpt2_id: token for token, gpt2_id in json.loads(Path(encoder_json).read_text("utf-8")).items()}
    vocab, unknown = {}, []
    for index, symbol in enumerate(symbols):
        if symbol.isdigit() and index >= len(SPECIAL_SYMBOLS):
            if int(symbol) not in gpt2_tokens:
                unknown.append(symbol)
                continue
            symbol = gpt2_tokens[int(symbol)]
        vocab.setdefault(symbol, index)
    if unknown:
        raise ConversionError(f"{dict_path} has GPT-2 ids missing from {encoder_json}: {unknown[:10]}.")
    missing = sorted(set(gpt2_tokens.values()) - set(vocab))
    if missing:
        raise ConversionError(
            f"{len(missing)} GPT-2 BPE tokens (e.g. {missing[:5]}) are not in {dict_path}: the tokenizer conversion "
            "needs a dictionary that covers the whole BPE vocabulary, as RoBERTa's (and the released Luna's) does."
        )
    lines = Path(vocab_bpe).read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    return RobertaTokenizer(
        vocab=vocab,
        merges=merges,
        mask_token=AddedToken("<mask>", lstrip=True, rstrip=False),
        model_max_length=max_length,
    )


# ---------------------------------------------------------------------------------------------------------------
# Driver


AUTO_CLASS_NAMES = {
    LunaForMaskedLM: "AutoModelForMaskedLM",
    LunaForSequenceClassification: "AutoModelForSequenceClassification",
    LunaForMultipleChoice: "AutoModelForMultipleChoice",
    LunaForConditionalGeneration: "AutoModelForSeq2SeqLM",
}


def write_card(folder: Path, model, args: Arguments, head_name: str | None, model_id: str) -> None:
    """README.md of the converted folder (uploaded as is with --push_to_hub)."""
    config = model.config
    kind = f"the classification head {head_name!r}" if head_name else "the masked-LM head"
    code, tags = "luna_bert", ("fill-mask",) if head_name is None else ("text-classification",)
    data = (
        "What the authors trained it on (for their released base models: BookCorpus and English Wikipedia, "
        "paper §4.3 and Table 8; a finetuned checkpoint adds its task's data). The conversion reads no data."
    )
    if isinstance(model, LunaForConditionalGeneration):
        kind, code, tags = "its encoder, decoder and output projection", "luna", ("translation",)
        data = "What the authors trained it on (paper §4.2: WMT'14 English-German). The conversion reads no data."
    write_model_card(
        folder, config=config, script="scripts/convert_fairseq_luna_to_hf.py", model_id=model_id,
        load_class=AUTO_CLASS_NAMES[type(model)],
        title=f"{model_id}: the authors' Luna checkpoint for transformers",
        summary=f"The fairseq checkpoint `{Path(args.fairseq_checkpoint).name}` of Ma et al. (the authors' "
                f"`{code}` code), converted tensor by tensor with {kind} into `{type(model).__name__}` "
                f"({config.num_hidden_layers} layers, hidden {config.hidden_size}, l = {config.projected_length}, "
                f"{'tied' if config.tie_key_value else 'untied'} key/value, {model.num_parameters() / 1e6:.2f}M "
                f"parameters). Nothing was trained or changed.",
        data=data,
        metrics={},
        no_metrics_reason="a conversion measures no task metric. luna-hf's tests check the converter against an "
                          "independent re-implementation of the authors' forward pass (largest difference 5e-6 in "
                          "float32, 1e-14 in float64; docs/conversion.md).",
        limitations=[
            "The released files themselves were not available where the converter was written: it was checked "
            "against checkpoints in their layout, and it stops, naming the tensor, on anything it does not expect.",
            f"Inputs of at most {config.max_sequence_length} tokens.",
        ],
        tags=tags,
        pipeline_tag="fill-mask" if isinstance(model, LunaForMaskedLM) else None,
    )  # fmt: skip


def convert(args: Arguments) -> Path:
    output_dir = Path(args.output_dir)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())) and not args.overwrite_output_dir:
        raise ConversionError(f"--output_dir {output_dir} exists and is not empty; pass --overwrite_output_dir.")
    if args.dict and not (args.bpe_encoder_json and args.bpe_vocab):
        raise ConversionError("--dict needs the GPT-2 BPE files too: --bpe_encoder_json and --bpe_vocab.")

    checkpoint = load_checkpoint(args.fairseq_checkpoint, args.trust_pickle)
    fairseq_arguments(checkpoint)
    if is_translation(checkpoint):
        if args.dict:
            raise ConversionError("--dict converts luna_bert's GPT-2 BPE tokenizer, not a translation dictionary.")
        head_name = None
        model = LunaForConditionalGeneration(translation_config(checkpoint))
        converted = convert_translation_state_dict(checkpoint, model)
        # fairseq-generate's defaults (beam 5, up to 200 new tokens), not transformers' max_length=20
        # As a total length (the start token + 200), so that a caller's max_length or max_new_tokens, and
        # Seq2SeqTrainer's generation_max_length, override it: a stored max_new_tokens would override them.
        model.generation_config.num_beams = 5
        model.generation_config.max_length = min(201, model.config.max_position_embeddings)
    else:
        head, head_name = choose_head(checkpoint, args.head, args.classification_head)
        model = HEAD_CLASSES[head](luna_config(checkpoint, head, head_name))
        converted = convert_state_dict(checkpoint, model, head_name)
    config = model.config
    model.load_state_dict(converted, strict=False)
    model.eval()
    dtypes = sorted({str(t.dtype) for t in converted.values()} - {"torch.float32"})
    if dtypes:
        logger.warning("Checkpoint tensors in %s were converted to float32.", dtypes)
    tokenizer = None
    if args.dict:
        tokenizer = build_tokenizer(
            args.dict, args.bpe_encoder_json, args.bpe_vocab, config.vocab_size, config.max_sequence_length
        )

    # Stage next to the destination, check the saved folder, then move it into place.
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        write_card(staging, model, args, head_name, model_id=args.push_to_hub or output_dir.name)
        reloaded = type(model).from_pretrained(staging).state_dict()
        differing = [k for k, v in converted.items() if not torch.equal(reloaded[k], v.to(reloaded[k].dtype))]
        if differing:
            raise ConversionError(f"The saved folder does not reload to the converted tensors: {differing}")
        if output_dir.exists():
            shutil.rmtree(output_dir) if output_dir.is_dir() else output_dir.unlink()
        staging.rename(output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    summary = [
        f"{type(model).__name__}",
        f"{model.num_parameters() / 1e6:.2f}M parameters",
        f"{config.num_hidden_layers} layers",
        f"l={config.projected_length}",
        f"{'tied' if config.tie_key_value else 'untied'} K/V",
        f"{'dynamic' if config.dynamic_projection else 'fixed'} projection",
    ]
    if head_name:
        outputs = model.classifier.out_proj.out_features
        summary.append(f"head {head_name!r} ({outputs} outputs, classifier_pooling {config.classifier_pooling!r})")
    if tokenizer is not None:
        summary.append(f"tokenizer ({len(tokenizer)} tokens)")
    print(f"Converted {args.fairseq_checkpoint} -> {output_dir}: " + ", ".join(summary))
    if args.push_to_hub:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(args.push_to_hub, exist_ok=True)
        api.upload_folder(
            repo_id=args.push_to_hub, folder_path=output_dir, commit_message="Convert fairseq Luna checkpoint"
        )
        print(f"Uploaded {output_dir} to {args.push_to_hub}")
    return output_dir


def main(argv=None):
    logging.basicConfig(format="%(levelname)s: %(message)s", level=logging.INFO)
    (args,) = HfArgumentParser(Arguments).parse_args_into_dataclasses(args=argv)
    try:
        convert(args)
    except ConversionError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()

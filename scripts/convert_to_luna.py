#!/usr/bin/env python
"""Convert a pretrained BERT or RoBERTa checkpoint (a transformers folder) into a Luna model folder.

    python scripts/convert_to_luna.py --model_name_or_path all-MiniLM-L6-v2 --output_dir minilm-luna \
        --attention learned_kernel

Every layer keeps the original's embeddings (token types and position numbering included), LayerNorms, feed-forward
block, attention projections and head; only what the new attention adds is new:

- `--attention learned_kernel` (Shahbazi et al., 2025): the layer is BERT's layer with its softmax replaced by the
  learned-kernel linear attention; the query, key, value and output projections are BERT's, the feature maps phi are
  new (default initialisation).
- `--attention nested` (Luna, Ma et al., 2021): the unpack attention (tokens over the packed P) takes BERT's query
  and output projections; its values are the packed context itself (identity value projection: the context is a mix
  of BERT's values) and its keys are BERT's keys of the token whose value that would be (W_k W_v^+, so that a slot
  holding the value of token x gets the key of x). The pack attention (P over the tokens) takes BERT's query, key and
  value projections; P starts as an average token at positions 0..l-1 (the mean word embedding plus those position
  embeddings), so that each slot first attends as a typical token at its position would. P's LayerNorms copy the
  embeddings' and the attention's.

Then `scripts/transfer_attention.py` trains the new attention parameters to imitate the original's attention.
`--max_position_embeddings` extends the positions for longer inputs by copying the learned ones (Longformer's
recipe). Nothing is written to `--output_dir` unless the whole conversion succeeded and the saved folder reloads to
the converted tensors. See docs/conversion.md.
"""

import logging
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import transformers
from transformers import AutoConfig, AutoTokenizer, HfArgumentParser, set_seed

from luna_hf import (
    LunaConfig,
    LunaForMaskedLM,
    LunaForMultipleChoice,
    LunaForQuestionAnswering,
    LunaForSequenceClassification,
    LunaForTokenClassification,
    LunaModel,
)
from luna_hf.model_card import write_model_card

logger = logging.getLogger(__name__)

# Source architecture -> (Luna class, Auto class that loads it, the source's head kind).
HEADS = {
    "Model": (LunaModel, "AutoModel", "base"),
    "ForMaskedLM": (LunaForMaskedLM, "AutoModelForMaskedLM", "masked_lm"),
    "ForPreTraining": (LunaForMaskedLM, "AutoModelForMaskedLM", "masked_lm"),  # its next-sentence head is dropped
    "ForSequenceClassification": (LunaForSequenceClassification, "AutoModelForSequenceClassification", "sequence"),
    "ForMultipleChoice": (LunaForMultipleChoice, "AutoModelForMultipleChoice", "multiple_choice"),
    "ForTokenClassification": (LunaForTokenClassification, "AutoModelForTokenClassification", "token"),
    "ForQuestionAnswering": (LunaForQuestionAnswering, "AutoModelForQuestionAnswering", "question_answering"),
}
FAMILIES = {"bert": "Bert", "roberta": "Roberta"}
SUPPORTED_ARCHITECTURES = tuple(f"{family}{head}" for family in FAMILIES.values() for head in HEADS)
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


# What the new attention adds, by parameter name: what the conversion initialises rather than copies from BERT.
# Each entry matches whole name components ("pack_attention." is not "unpack_attention.").
NEW_ATTENTION_PARAMETERS = {
    "learned_kernel": ("attention.feature_map.",),
    "nested": (
        "embeddings.projected_embeddings",
        "embeddings.projected_layer_norm.",
        "pack_attention.",
        "unpack_attention.k_proj.",
        "unpack_attention.v_proj.",
        "packed_layer_norm.",
    ),
}
# What scripts/transfer_attention.py trains: the new parameters and, in nested Luna, the rest of the unpack attention.
# Its query and output projections start as BERT's, but they now serve tokens attending to l packed slots rather than
# to each other: trained too, the quickstart's post-hoc nested Luna reached 82.9% on SST-2 dev instead of 81.1%
# (seed 42, docs/conversion.md).
TRANSFERRED_PARAMETERS = {
    "learned_kernel": NEW_ATTENTION_PARAMETERS["learned_kernel"],
    "nested": (*NEW_ATTENTION_PARAMETERS["nested"], "unpack_attention."),
}


def source_head(architecture: str, family: str) -> tuple:
    """The Luna class, its Auto class and the head kind of a supported architecture, e.g. "BertForMaskedLM"."""
    return HEADS[architecture.removeprefix(FAMILIES[family])]


def is_new_attention_parameter(name: str, attention_type: str) -> bool:
    return has_component(name, NEW_ATTENTION_PARAMETERS[attention_type])


def is_transferred_parameter(name: str, attention_type: str) -> bool:
    return has_component(name, TRANSFERRED_PARAMETERS[attention_type])


def has_component(name: str, parts: tuple[str, ...]) -> bool:
    """Whether the parameter `name` holds one of `parts` as whole components ("a.b." in "x.a.b.c", not "x.za.b.c")."""
    return any(f".{part}" in f".{name}" for part in parts)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json")


class ConversionError(Exception):
    """A checkpoint or an argument this converter refuses; the message says why and what it accepts."""


@dataclass
class Arguments:
    model_name_or_path: str = field(metadata={"help": "A local transformers folder of a BERT or RoBERTa model."})
    output_dir: str = field(metadata={"help": "The Luna folder to write (must not exist)."})
    attention: Literal["nested", "learned_kernel"] = field(
        default="learned_kernel", metadata={"help": "Luna's nested attention, or the learned-kernel linear attention."}
    )
    projected_length: int = field(default=16, metadata={"help": "l, the length of P (nested attention only)."})
    kernel_num_projections: int = field(
        default=16,
        metadata={
            "help": "m, the learned projections of the feature map (learned_kernel only): more fit softmax attention "
            "more closely after transfer (docs/conversion.md) at the cost of more features per token."
        },
    )
    max_position_embeddings: int | None = field(
        default=None,
        metadata={
            "help": "Extend the position table to this many rows (the config's max_position_embeddings: 4096 for a "
            "BERT reading 4096 tokens, 4098 for a RoBERTa) by repeating the learned positions."
        },
    )
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace an existing --output_dir."})
    seed: int = field(default=0, metadata={"help": "Seed of the new parameters' initialisation (the feature maps)."})


# ---------------------------------------------------------------------------------------------------------------------
# Reading the source


def load_source(path: Path):
    """The source model, its architecture name and its family ("bert" or "roberta"), after the checks that need no
    weights: a supported architecture, weights present."""
    if not (path / "config.json").is_file():
        raise ConversionError(f"{path} has no config.json: pass a transformers model folder.")
    source_config = AutoConfig.from_pretrained(path)
    family = FAMILIES.get(source_config.model_type)
    architecture = (source_config.architectures or [f"{family or source_config.model_type}Model"])[0]
    if family is None or architecture not in SUPPORTED_ARCHITECTURES:
        raise ConversionError(
            f"{path} holds {architecture!r} (model_type {source_config.model_type!r}); the converter supports "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}."
        )
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise ConversionError(f"{path} has no weights (none of {', '.join(WEIGHT_FILES)}).")
    if getattr(source_config, "is_decoder", False) or getattr(source_config, "add_cross_attention", False):
        raise ConversionError(f"{path} is a decoder or has cross-attention: only encoders convert.")
    position_type = getattr(source_config, "position_embedding_type", "absolute")
    if position_type not in (None, "absolute"):
        raise ConversionError(f"{path} has position_embedding_type={position_type!r}; only 'absolute' converts.")
    _, _, head = source_head(architecture, source_config.model_type)
    if head == "masked_lm" and source_config.hidden_act != "gelu":
        raise ConversionError(
            f"{path}'s masked-LM head uses {source_config.hidden_act!r}; Luna's LM head applies gelu: convert the "
            "encoder (its Model architecture) instead."
        )
    if head == "question_answering" and source_config.num_labels != 2:
        raise ConversionError(
            f"{path}'s question-answering head has {source_config.num_labels} outputs; Luna's has 2 (start, end)."
        )
    source = getattr(transformers, architecture).from_pretrained(path, attn_implementation="eager").eval()
    return source, architecture, source_config.model_type


def load_tokenizer(path: Path, source_config):
    """The source's tokenizer, checked against the model; None (with a warning) if the folder has none."""
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        logger.warning("%s has no tokenizer (none of %s): the Luna folder will have none.", path, TOKENIZER_FILES)
        return None
    tokenizer = AutoTokenizer.from_pretrained(path)
    if len(tokenizer) > source_config.vocab_size or tokenizer.pad_token_id != source_config.pad_token_id:
        raise ConversionError(
            f"The tokenizer in {path} does not match the model: {len(tokenizer)} tokens and padding id "
            f"{tokenizer.pad_token_id}, the model has vocab_size {source_config.vocab_size} and pad_token_id "
            f"{source_config.pad_token_id}."
        )
    return tokenizer


# ---------------------------------------------------------------------------------------------------------------------
# The Luna configuration and tensors


def luna_config(source_config, family: str, args: Arguments) -> LunaConfig:
    position_numbering = "from_zero" if family == "bert" else "padding_offset"
    max_position_embeddings = args.max_position_embeddings or source_config.max_position_embeddings
    if max_position_embeddings < source_config.max_position_embeddings:
        raise ConversionError(
            f"--max_position_embeddings {max_position_embeddings} is below the original's "
            f"{source_config.max_position_embeddings}: it can only extend the positions."
        )
    config = LunaConfig(
        vocab_size=source_config.vocab_size,
        hidden_size=source_config.hidden_size,
        num_hidden_layers=source_config.num_hidden_layers,
        num_attention_heads=source_config.num_attention_heads,
        intermediate_size=source_config.intermediate_size,
        hidden_act=source_config.hidden_act,
        hidden_dropout_prob=source_config.hidden_dropout_prob,
        attention_probs_dropout_prob=source_config.attention_probs_dropout_prob,
        classifier_dropout=getattr(source_config, "classifier_dropout", None),
        max_position_embeddings=max_position_embeddings,
        initializer_range=source_config.initializer_range,
        layer_norm_eps=source_config.layer_norm_eps,
        pad_token_id=source_config.pad_token_id,
        bos_token_id=getattr(source_config, "bos_token_id", None),
        eos_token_id=getattr(source_config, "eos_token_id", None),
        type_vocab_size=source_config.type_vocab_size,
        position_numbering=position_numbering,
        attention_type=args.attention,
        projected_length=args.projected_length,
        kernel_num_projections=args.kernel_num_projections,
        tie_key_value=False,  # BERT's keys and values are separate projections
        tie_word_embeddings=getattr(source_config, "tie_word_embeddings", True),
        num_labels=source_config.num_labels,
        id2label=source_config.id2label,
        label2id=source_config.label2id,
        problem_type=source_config.problem_type,
    )
    if args.attention == "nested" and args.projected_length > config.max_sequence_length:
        raise ConversionError(f"--projected_length {args.projected_length} exceeds the {config.max_sequence_length} "
                              "positions that initialise P.")  # fmt: skip
    return config


def extended_positions(positions: torch.Tensor, config: LunaConfig) -> torch.Tensor:
    """Longformer's recipe: the learned positions repeated until the table has `config.max_position_embeddings` rows,
    so that position k reads the original's k mod n (n = the original's number of real positions). RoBERTa's rows up
    to the padding index are kept where they are."""
    first = 0 if config.position_numbering == "from_zero" else config.pad_token_id + 1
    learned = positions[first:]
    repeats = -(-(config.max_position_embeddings - first) // learned.shape[0])
    return torch.cat([positions[:first], learned.repeat(repeats, 1)])[: config.max_position_embeddings]


def linear(state: dict, source: str, target: str) -> dict:
    return {f"{target}.weight": state[f"{source}.weight"], f"{target}.bias": state[f"{source}.bias"]}


def embedding_tensors(base: dict, config: LunaConfig) -> dict:
    positions = extended_positions(base["embeddings.position_embeddings.weight"], config)
    tensors = {
        "embeddings.word_embeddings.weight": base["embeddings.word_embeddings.weight"],
        "embeddings.position_embeddings.weight": positions,
        "embeddings.token_type_embeddings.weight": base["embeddings.token_type_embeddings.weight"],
        **linear(base, "embeddings.LayerNorm", "embeddings.layer_norm"),
    }
    if config.attention_type == "nested":
        # P starts as an average token at positions 0..l-1: each slot's pack query is then that of a typical token
        # at its position, so the slots attend differently from the start; its LayerNorm is the embeddings'.
        first = 0 if config.position_numbering == "from_zero" else config.pad_token_id + 1
        slot_positions = positions[first : first + config.projected_length]
        average_token = base["embeddings.word_embeddings.weight"].mean(dim=0)
        average_token = average_token + base["embeddings.token_type_embeddings.weight"][0]
        tensors["embeddings.projected_embeddings"] = average_token + slot_positions
        tensors.update(linear(base, "embeddings.LayerNorm", "embeddings.projected_layer_norm"))
    return tensors


def layer_tensors(base: dict, index: int, config: LunaConfig) -> dict:
    source, target = f"encoder.layer.{index}", f"layers.{index}"
    tensors = {
        **linear(base, f"{source}.attention.output.LayerNorm", f"{target}.attention_layer_norm"),
        **linear(base, f"{source}.intermediate.dense", f"{target}.fc1"),
        **linear(base, f"{source}.output.dense", f"{target}.fc2"),
        **linear(base, f"{source}.output.LayerNorm", f"{target}.ffn_layer_norm"),
    }
    attention = f"{source}.attention.self"
    if config.attention_type == "learned_kernel":
        for source_name, target_name in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            tensors.update(linear(base, f"{attention}.{source_name}", f"{target}.attention.{target_name}"))
        tensors.update(linear(base, f"{source}.attention.output.dense", f"{target}.attention.o_proj"))
        return tensors

    # Nested: the pack attention is BERT's attention with P as the queries (no output projection: its raw context,
    # a mix of BERT's values, is what the unpack attention reads).
    for source_name, target_name in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
        tensors.update(linear(base, f"{attention}.{source_name}", f"{target}.pack_attention.{target_name}"))
    tensors.update(linear(base, f"{attention}.query", f"{target}.unpack_attention.q_proj"))
    tensors.update(linear(base, f"{source}.attention.output.dense", f"{target}.unpack_attention.o_proj"))
    # The unpack values are the context as it is; its keys are BERT's key of the token whose value the context
    # holds: k = W_k x + b_k and v = W_v x + b_v give k = W_k W_v^+ (v - b_v) + b_k (exact where W_v is invertible).
    key_weight, key_bias = base[f"{attention}.key.weight"].double(), base[f"{attention}.key.bias"].double()
    value_weight, value_bias = base[f"{attention}.value.weight"].double(), base[f"{attention}.value.bias"].double()
    value_to_key = key_weight @ torch.linalg.pinv(value_weight)
    dtype = base[f"{attention}.key.weight"].dtype
    tensors[f"{target}.unpack_attention.k_proj.weight"] = value_to_key.to(dtype)
    tensors[f"{target}.unpack_attention.k_proj.bias"] = (key_bias - value_to_key @ value_bias).to(dtype)
    tensors[f"{target}.unpack_attention.v_proj.weight"] = torch.eye(config.hidden_size, dtype=dtype)
    tensors[f"{target}.unpack_attention.v_proj.bias"] = torch.zeros(config.hidden_size, dtype=dtype)
    # P's residual LayerNorm after the pack attention: the tokens' one after BERT's attention.
    tensors.update(linear(base, f"{source}.attention.output.LayerNorm", f"{target}.packed_layer_norm"))
    return tensors


def head_tensors(state: dict, head: str, family: str) -> dict:
    """The head's tensors under Luna's names. BERT's sentence heads (and RoBERTa's multiple choice) are pooler
    (dense + tanh on the first token) -> dropout -> linear; Luna's (RoBERTa's) are dense -> tanh -> dropout ->
    out_proj on the first real token: the same function, with the pooler's dense as `classifier.dense`."""
    prefix = "bert" if family == "bert" else "roberta"
    if head == "masked_lm":
        lm = "cls.predictions" if family == "bert" else "lm_head"
        transform = "cls.predictions.transform" if family == "bert" else "lm_head"
        layer_norm = "cls.predictions.transform.LayerNorm" if family == "bert" else "lm_head.layer_norm"
        return {
            **linear(state, f"{transform}.dense", "lm_head.dense"),
            **linear(state, layer_norm, "lm_head.layer_norm"),
            **linear(state, f"{lm}.decoder", "lm_head.decoder"),
        }
    if head in ("sequence", "multiple_choice") and (family == "bert" or head == "multiple_choice"):
        return {
            **linear(state, f"{prefix}.pooler.dense", "classifier.dense"),
            **linear(state, "classifier", "classifier.out_proj"),
        }
    if head == "sequence":  # RoBERTa's classification head is Luna's
        return {
            **linear(state, "classifier.dense", "classifier.dense"),
            **linear(state, "classifier.out_proj", "classifier.out_proj"),
        }
    if head == "token":
        return linear(state, "classifier", "classifier")
    if head == "question_answering":
        return linear(state, "qa_outputs", "qa_outputs")
    return {}


def convert_state_dict(source, architecture: str, family: str, config: LunaConfig) -> dict[str, torch.Tensor]:
    state = {name: tensor.detach().clone() for name, tensor in source.state_dict().items()}
    _, _, head = source_head(architecture, family)
    base_prefix = "" if head == "base" else f"{source.base_model_prefix}."
    base = {name.removeprefix(base_prefix): tensor for name, tensor in state.items() if name.startswith(base_prefix)}
    tensors = embedding_tensors(base, config)
    for index in range(config.num_hidden_layers):
        tensors.update(layer_tensors(base, index, config))
    luna_prefix = "" if head == "base" else "luna."
    converted = {f"{luna_prefix}{name}": tensor for name, tensor in tensors.items()}
    converted.update(head_tensors(state, head, family))
    return converted


# ---------------------------------------------------------------------------------------------------------------------
# Driver


def write_card(folder: Path, model, args: Arguments, architecture: str, auto_class: str) -> None:
    config = model.config
    attention = {
        "learned_kernel": "the learned-kernel linear attention (Shahbazi et al., 2025); its feature maps are new",
        "nested": f"Luna's nested attention (Ma et al., 2021), l = {config.projected_length}; the pack attention, "
        "P and the unpack keys/values are new, initialised from the original's projections",
    }[args.attention]
    write_model_card(
        folder, config=config, script="scripts/convert_to_luna.py", model_id=Path(args.output_dir).name,
        load_class=auto_class,
        title=f"{Path(args.output_dir).name}: {Path(args.model_name_or_path).name} converted to Luna",
        summary=f"`{architecture}` from `{args.model_name_or_path}` converted into `{type(model).__name__}` with "
                f"{attention}. Embeddings, LayerNorms, feed-forward blocks, attention projections and the head are "
                "the original's, unchanged.",
        data="What the original was trained on. The conversion reads no data.",
        metrics={},
        no_metrics_reason="a conversion measures no task metric. Before attention transfer "
                          "(scripts/transfer_attention.py) and fine-tuning the new attention does not compute the "
                          "original's, so the outputs differ from the original's (docs/conversion.md).",
        limitations=[
            "Not a drop-in replacement before scripts/transfer_attention.py and fine-tuning.",
            "The weights are the original's: its license and terms apply, whatever the license field says.",
            f"Inputs of at most {config.max_sequence_length} tokens"
            + (" (positions beyond the original's repeat its learned ones)." if args.max_position_embeddings else "."),
        ],
    )  # fmt: skip


def convert(args: Arguments) -> Path:
    source_dir, output_dir = Path(args.model_name_or_path), Path(args.output_dir)
    if output_dir.exists() and not args.overwrite_output_dir:
        raise ConversionError(f"--output_dir {output_dir} exists; pass --overwrite_output_dir to replace it.")

    # Phase 1: read and check the source.
    source, architecture, family = load_source(source_dir)
    tokenizer = load_tokenizer(source_dir, source.config)

    # Phase 2: build the Luna model and fill it with the converted tensors.
    config = luna_config(source.config, family, args)
    luna_class, auto_class, _ = source_head(architecture, family)
    set_seed(args.seed)
    model = luna_class(config)
    converted = convert_state_dict(source, architecture, family, config)
    missing, unexpected = model.load_state_dict(converted, strict=False)
    unfilled = [name for name in missing if not is_new_attention_parameter(name, args.attention)]
    if unexpected or unfilled:
        raise ConversionError(f"Converted tensors without a place: {unexpected}; places without a tensor: {unfilled}")
    model.tie_weights()
    model.eval()

    # Phase 3: write to a staging folder next to the destination, check that it reloads, then move it into place.
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.model_max_length = config.max_sequence_length
            tokenizer.save_pretrained(staging)
        write_card(staging, model, args, architecture, auto_class)
        reloaded = luna_class.from_pretrained(staging).state_dict()
        # A float16 or bfloat16 source is converted into the model's float32.
        differing = [
            name
            for name, tensor in converted.items()
            if not torch.equal(reloaded[name], tensor.to(reloaded[name].dtype))
        ]
        if differing:
            raise ConversionError(f"The saved folder does not reload to the converted tensors: {differing}")
        if output_dir.exists():
            shutil.rmtree(output_dir)
        staging.rename(output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    new_parameters = sum(
        parameter.numel()
        for name, parameter in model.named_parameters()
        if is_new_attention_parameter(name, args.attention)
    )
    print(
        f"Converted {architecture} {source_dir} -> {output_dir}: {luna_class.__name__}, attention {args.attention}, "
        f"{model.num_parameters() / 1e6:.2f}M parameters ({new_parameters / 1e6:.3f}M new), "
        f"{config.max_sequence_length} positions"
    )
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

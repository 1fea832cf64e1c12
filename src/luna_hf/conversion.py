"""Turn a pretrained BERT or RoBERTa (MiniLM among them), or a ViT, into a Luna model: `convert_to_luna`.

    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from luna_hf import convert_to_luna

    teacher = AutoModelForSequenceClassification.from_pretrained("my-finetuned-minilm")
    tokenizer = AutoTokenizer.from_pretrained("my-finetuned-minilm")
    student = convert_to_luna(teacher, attention="learned_kernel", tokenizer=tokenizer)

Every layer keeps the original's embeddings (token types and position numbering included), LayerNorms, feed-forward
block, attention projections and head; only what the new attention adds is new:

- `attention="learned_kernel"` (Shahbazi et al., 2025): the layer is BERT's layer with its softmax replaced by the
  learned-kernel linear attention; the query, key, value and output projections are BERT's, the feature maps phi are
  new (default initialisation).
- `attention="nested"` (Luna, Ma et al., 2021): the unpack attention (tokens over the packed P) takes BERT's query
  and output projections; its values are the packed context itself (identity value projection: the context is a mix
  of BERT's values) and its keys are BERT's keys of the token whose value that would be (W_k W_v^+, so that a slot
  holding the value of token x gets the key of x). The pack attention (P over the tokens) takes BERT's query, key and
  value projections; P starts as an average token at positions 0..l-1 (the mean word embedding plus those position
  embeddings), so that each slot first attends as a typical token at its position would. P's LayerNorms copy the
  embeddings' and the attention's.

A ViT (`ViTModel`, `ViTForImageClassification`) becomes a pre-LayerNorm Luna reading images
(`LunaForImageClassification`): its patch projection, [CLS] token, positions, LayerNorms, attention projections,
feed-forward blocks and classifier carry over as they are (ViT's optional pooler is dropped); P starts as the
embedding of a blank patch (the projection's bias) at l positions spread over the grid.

Then `luna_hf.transfer_attention` trains the new attention to imitate the original's. `max_position_embeddings`
extends the positions for longer inputs by copying the learned ones (Longformer's recipe). docs/conversion.md.
"""

import logging
import shutil
import tempfile
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, set_seed

from .configuration_luna import LunaConfig
from .modeling_luna import (
    LunaForImageClassification,
    LunaForMaskedLM,
    LunaForMultipleChoice,
    LunaForQuestionAnswering,
    LunaForSequenceClassification,
    LunaForTokenClassification,
    LunaModel,
    LunaPreTrainedModel,
)

logger = logging.getLogger(__name__)

# Source architecture suffix -> (Luna class, Auto class that loads it, the source's head kind).
HEADS = {
    "Model": (LunaModel, "AutoModel", "base"),
    "ForMaskedLM": (LunaForMaskedLM, "AutoModelForMaskedLM", "masked_lm"),
    "ForPreTraining": (LunaForMaskedLM, "AutoModelForMaskedLM", "masked_lm"),  # its next-sentence head is dropped
    "ForSequenceClassification": (LunaForSequenceClassification, "AutoModelForSequenceClassification", "sequence"),
    "ForMultipleChoice": (LunaForMultipleChoice, "AutoModelForMultipleChoice", "multiple_choice"),
    "ForTokenClassification": (LunaForTokenClassification, "AutoModelForTokenClassification", "token"),
    "ForQuestionAnswering": (LunaForQuestionAnswering, "AutoModelForQuestionAnswering", "question_answering"),
    "ForImageClassification": (LunaForImageClassification, "AutoModelForImageClassification", "image"),
}
FAMILIES = {"bert": "Bert", "roberta": "Roberta", "vit": "ViT"}
VISION_FAMILIES = ("vit",)
SUPPORTED_ARCHITECTURES = (
    *(f"{FAMILIES[family]}{head}" for family in ("bert", "roberta") for head in HEADS if "Image" not in head),
    "ViTModel",
    "ViTForImageClassification",
)
# Each family's layers (their prefix, then their parts under Luna's roles) as transformers >= 5.9 holds them in
# memory; BERT's and RoBERTa's names are the same.
LAYER_PARTS = {
    "text": {"layers": "encoder.layer", "query": "attention.self.query", "key": "attention.self.key",
             "value": "attention.self.value", "attention_output": "attention.output.dense",
             "fc1": "intermediate.dense", "fc2": "output.dense", "attention_layer_norm": "attention.output.LayerNorm",
             "ffn_layer_norm": "output.LayerNorm"},
    "vit": {"layers": "layers", "query": "attention.q_proj", "key": "attention.k_proj", "value": "attention.v_proj",
            "attention_output": "attention.o_proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2",
            "attention_layer_norm": "layernorm_before", "ffn_layer_norm": "layernorm_after"},
}  # fmt: skip
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
AUTO_CLASS_NAMES = {luna_class.__name__: auto_class for luna_class, auto_class, _ in HEADS.values()}
ATTENTIONS = ("learned_kernel", "nested")

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
# What `transfer_attention` trains: the new parameters and, in nested Luna, the rest of the unpack attention. Its query
# and output projections start as BERT's, but they now serve tokens attending to l packed slots rather than to each
# other: trained too, the quickstart's post-hoc nested Luna reached 82.9% on SST-2 dev instead of 81.1% (seed 42,
# docs/conversion.md).
TRANSFERRED_PARAMETERS = {
    "learned_kernel": NEW_ATTENTION_PARAMETERS["learned_kernel"],
    "nested": (*NEW_ATTENTION_PARAMETERS["nested"], "unpack_attention."),
}


class ConversionError(ValueError):
    """A checkpoint or an argument the converter refuses; the message says why and what it accepts."""


def has_component(name: str, parts: tuple[str, ...]) -> bool:
    """Whether the parameter `name` holds one of `parts` as whole components ("a.b." in "x.a.b.c", not "x.za.b.c")."""
    return any(f".{part}" in f".{name}" for part in parts)


def is_new_attention_parameter(name: str, attention_type: str) -> bool:
    return has_component(name, NEW_ATTENTION_PARAMETERS[attention_type])


def is_transferred_parameter(name: str, attention_type: str) -> bool:
    return has_component(name, TRANSFERRED_PARAMETERS[attention_type])


def source_head(architecture: str, family: str) -> tuple:
    """The Luna class, its Auto class and the head kind of a supported architecture, e.g. "BertForMaskedLM"."""
    return HEADS[architecture.removeprefix(FAMILIES[family])]


# ---------------------------------------------------------------------------------------------------------------------
# Checking the source


def check_source(source_config, architecture: str, where: str) -> str:
    """Refuse, before any model is built, what cannot convert; return the family ("bert" or "roberta")."""
    family = FAMILIES.get(source_config.model_type)
    if family is None or architecture not in SUPPORTED_ARCHITECTURES:
        raise ConversionError(
            f"{where} holds {architecture!r} (model_type {source_config.model_type!r}); the converter supports "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}: BERT-style encoders with absolute positions and one set of "
            "weights per layer (not ALBERT's shared layers, not decoder-only models), and ViTs (not Swin's windows, "
            "not DeiT's distillation token)."
        )
    if source_config.model_type in VISION_FAMILIES:
        return source_config.model_type
    if getattr(source_config, "is_decoder", False) or getattr(source_config, "add_cross_attention", False):
        raise ConversionError(f"{where} is a decoder or has cross-attention: only encoders convert.")
    position_type = getattr(source_config, "position_embedding_type", "absolute")
    if position_type not in (None, "absolute"):
        raise ConversionError(
            f"{where} has position_embedding_type={position_type!r} (relative positions); only 'absolute' converts."
        )
    _, _, head = source_head(architecture, source_config.model_type)
    if head == "masked_lm" and source_config.hidden_act != "gelu":
        raise ConversionError(
            f"{where}'s masked-LM head uses {source_config.hidden_act!r}; Luna's LM head applies gelu: convert the "
            "encoder (its Model architecture) instead."
        )
    if head == "question_answering" and source_config.num_labels != 2:
        raise ConversionError(
            f"{where}'s question-answering head has {source_config.num_labels} outputs; Luna's has 2 (start, end)."
        )
    return source_config.model_type


def read_source_config(path: Path):
    """A source folder's config and architecture, after the checks that need no weights (and that it has some)."""
    if not (path / "config.json").is_file():
        raise ConversionError(f"{path} has no config.json: pass a transformers model folder.")
    source_config = AutoConfig.from_pretrained(path)
    family_name = FAMILIES.get(source_config.model_type) or source_config.model_type
    architecture = (source_config.architectures or [f"{family_name}Model"])[0]
    check_source(source_config, architecture, str(path))
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise ConversionError(f"{path} has no weights (none of {', '.join(WEIGHT_FILES)}).")
    return source_config, architecture


def load_source(path: Path):
    """The source model from a folder, loaded once the folder has passed `read_source_config`'s checks."""
    _, architecture = read_source_config(path)
    return getattr(transformers, architecture).from_pretrained(path, attn_implementation="eager").eval()


def check_tokenizer(tokenizer, source_config) -> None:
    if len(tokenizer) > source_config.vocab_size or tokenizer.pad_token_id != source_config.pad_token_id:
        raise ConversionError(
            f"The tokenizer ({len(tokenizer)} tokens, padding id {tokenizer.pad_token_id}) does not match the model "
            f"(vocab_size {source_config.vocab_size}, pad_token_id {source_config.pad_token_id}): pass the tokenizer "
            "the model was trained with."
        )


# ---------------------------------------------------------------------------------------------------------------------
# The Luna configuration and tensors


# The fields every source family carries over as they are.
SHARED_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
                 "hidden_dropout_prob", "attention_probs_dropout_prob", "initializer_range", "layer_norm_eps",
                 "num_labels", "id2label", "label2id", "problem_type")  # fmt: skip


def luna_config(source_config, family: str, attention: dict, max_position_embeddings: int | None) -> LunaConfig:
    """The Luna config of `source_config`; `attention`: attention_type, projected_length, kernel_num_projections,
    kernel_feature_map."""
    shared = {name: getattr(source_config, name) for name in SHARED_FIELDS}
    shared.update(attention, tie_key_value=False)  # the source's keys and values are separate projections
    if family in VISION_FAMILIES:
        if max_position_embeddings is not None:
            raise ConversionError("max_position_embeddings extends a text model's positions; a ViT reads other image "
                                  "sizes with interpolate_pos_encoding=True instead.")  # fmt: skip
        return vision_config(source_config, shared)
    max_position_embeddings = max_position_embeddings or source_config.max_position_embeddings
    if max_position_embeddings < source_config.max_position_embeddings:
        raise ConversionError(
            f"max_position_embeddings={max_position_embeddings} is below the original's "
            f"{source_config.max_position_embeddings}: it can only extend the positions."
        )
    config = LunaConfig(
        **shared,
        vocab_size=source_config.vocab_size,
        classifier_dropout=getattr(source_config, "classifier_dropout", None),
        max_position_embeddings=max_position_embeddings,
        pad_token_id=source_config.pad_token_id,
        bos_token_id=getattr(source_config, "bos_token_id", None),
        eos_token_id=getattr(source_config, "eos_token_id", None),
        type_vocab_size=source_config.type_vocab_size,
        position_numbering="from_zero" if family == "bert" else "padding_offset",
        tie_word_embeddings=getattr(source_config, "tie_word_embeddings", True),
    )
    if config.attention_type == "nested" and config.projected_length > config.max_sequence_length:
        raise ConversionError(f"projected_length={config.projected_length} exceeds the {config.max_sequence_length} "
                              "positions that initialise P.")  # fmt: skip
    return config


def vision_config(source_config, shared: dict) -> LunaConfig:
    image_size, patch_size = source_config.image_size, source_config.patch_size
    if not isinstance(image_size, int) or not isinstance(patch_size, int):
        raise ConversionError(f"The ViT's image_size {image_size!r} and patch_size {patch_size!r} must be single "
                              "integers (square images and patches).")  # fmt: skip
    tokens = (image_size // patch_size) ** 2 + 1  # the patches and [CLS]
    if shared["attention_type"] == "nested" and shared["projected_length"] > tokens:
        raise ConversionError(f"projected_length={shared['projected_length']} exceeds the image's {tokens} tokens.")
    return LunaConfig(
        **shared, vocab_size=1, pad_token_id=0, bos_token_id=None, eos_token_id=None, type_vocab_size=0,  # no tokens
        image_size=image_size, patch_size=patch_size, num_channels=source_config.num_channels,
        max_position_embeddings=tokens, position_numbering="from_zero", normalize_before=True,
        tie_word_embeddings=False,
    )  # fmt: skip


def extended_positions(positions: torch.Tensor, config: LunaConfig) -> torch.Tensor:
    """Longformer's recipe: the learned positions repeated until the table has `config.max_position_embeddings` rows,
    so that position k reads the original's k mod n (n = the original's number of real positions). RoBERTa's rows up
    to the padding index are kept where they are."""
    first = 0 if config.position_numbering == "from_zero" else config.pad_token_id + 1
    learned = positions[first:]
    repeats = -(-(config.max_position_embeddings - first) // learned.shape[0])
    return torch.cat([positions[:first], learned.repeat(repeats, 1)])[: config.max_position_embeddings]


def linear(state: dict, source: str, target: str) -> dict:
    """A linear layer's or LayerNorm's weight and bias (zeros where the source has none: ViT's qkv_bias=False)."""
    weight = state[f"{source}.weight"]
    bias = state.get(f"{source}.bias", torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device))
    return {f"{target}.weight": weight, f"{target}.bias": bias}


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


def vision_embedding_tensors(base: dict, config: LunaConfig) -> dict:
    positions = base["embeddings.position_embeddings"]
    tensors = {
        "embeddings.cls_token": base["embeddings.cls_token"],
        "embeddings.position_embeddings": positions,
        **linear(base, "embeddings.patch_embeddings.projection", "embeddings.projection"),
        **linear(base, "layernorm", "layer_norm"),  # ViT's final LayerNorm: pre-LN Luna's
    }
    if config.attention_type == "nested":
        # P: a blank patch (the projection of a zero, i.e. mean, image is its bias) at l positions spread over the
        # grid, so that the slots first attend as patches in different places would; P's final LayerNorm is X's.
        spread = 1 + torch.arange(config.projected_length) * config.num_patches // config.projected_length
        bias = tensors["embeddings.projection.bias"]
        tensors["embeddings.projected_embeddings"] = bias + positions[0, spread]
        tensors.update(linear(base, "layernorm", "packed_layer_norm"))
    return tensors


def layer_tensors(base: dict, index: int, config: LunaConfig, parts: dict) -> dict:
    """Layer `index`'s tensors; `parts` names the source layer's parts (`LAYER_PARTS`)."""
    source, target = f"{parts['layers']}.{index}", f"layers.{index}"
    part = {role: f"{source}.{name}" for role, name in parts.items() if role != "layers"}
    tensors = {}
    for role in ("attention_layer_norm", "fc1", "fc2", "ffn_layer_norm"):
        tensors.update(linear(base, part[role], f"{target}.{role}"))
    if config.attention_type == "learned_kernel":
        for role, target_name in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            tensors.update(linear(base, part[role], f"{target}.attention.{target_name}"))
        tensors.update(linear(base, part["attention_output"], f"{target}.attention.o_proj"))
        return tensors

    # Nested: the pack attention is BERT's attention with P as the queries (no output projection: its raw context,
    # a mix of BERT's values, is what the unpack attention reads).
    for role, target_name in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
        tensors.update(linear(base, part[role], f"{target}.pack_attention.{target_name}"))
    tensors.update(linear(base, part["query"], f"{target}.unpack_attention.q_proj"))
    tensors.update(linear(base, part["attention_output"], f"{target}.unpack_attention.o_proj"))
    # The unpack values are the context as it is; its keys are BERT's key of the token whose value the context
    # holds: k = W_k x + b_k and v = W_v x + b_v give k = W_k W_v^+ (v - b_v) + b_k (exact where W_v is invertible).
    key, value = linear(base, part["key"], "key"), linear(base, part["value"], "value")
    key_weight, key_bias = key["key.weight"].double(), key["key.bias"].double()
    value_weight, value_bias = value["value.weight"].double(), value["value.bias"].double()
    value_to_key = key_weight @ torch.linalg.pinv(value_weight)
    dtype = key["key.weight"].dtype
    tensors[f"{target}.unpack_attention.k_proj.weight"] = value_to_key.to(dtype)
    tensors[f"{target}.unpack_attention.k_proj.bias"] = (key_bias - value_to_key @ value_bias).to(dtype)
    tensors[f"{target}.unpack_attention.v_proj.weight"] = torch.eye(config.hidden_size, dtype=dtype)
    tensors[f"{target}.unpack_attention.v_proj.bias"] = torch.zeros(config.hidden_size, dtype=dtype)
    # P's LayerNorm: the tokens' one at the attention (after it in BERT, before it in ViT).
    tensors.update(linear(base, part["attention_layer_norm"], f"{target}.packed_layer_norm"))
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
    if head == "image":
        return linear(state, "classifier", "classifier")
    return {}


def convert_state_dict(source, architecture: str, family: str, config: LunaConfig) -> dict[str, torch.Tensor]:
    state = {name: tensor.detach().clone() for name, tensor in source.state_dict().items()}
    _, _, head = source_head(architecture, family)
    base_prefix = "" if head == "base" else f"{source.base_model_prefix}."
    base = {name.removeprefix(base_prefix): tensor for name, tensor in state.items() if name.startswith(base_prefix)}
    vision = family in VISION_FAMILIES
    tensors = vision_embedding_tensors(base, config) if vision else embedding_tensors(base, config)
    for index in range(config.num_hidden_layers):
        tensors.update(layer_tensors(base, index, config, LAYER_PARTS["vit" if vision else "text"]))
    luna_prefix = "" if head == "base" else "luna."
    converted = {f"{luna_prefix}{name}": tensor for name, tensor in tensors.items()}
    converted.update(head_tensors(state, head, family))
    return converted


# ---------------------------------------------------------------------------------------------------------------------
# The API


def convert_to_luna(
    model_or_path,
    attention: str = "learned_kernel",
    projected_length: int = 16,
    kernel_num_projections: int = 16,
    max_position_embeddings: int | None = None,
    tokenizer=None,
    seed: int = 0,
    kernel_feature_map: str = "learned",
) -> LunaPreTrainedModel:
    """A Luna model with `model_or_path`'s weights (a BERT or RoBERTa model, or a folder holding one), the head's
    Luna class for the source's head, in eval mode. Only the new attention is new (see the module's docstring).

        student = convert_to_luna(teacher, attention="nested", projected_length=16, tokenizer=tokenizer)
        losses = transfer_attention(student, teacher, texts, tokenizer)

    `max_position_embeddings` extends the positions (4096 for a BERT reading 4,096 tokens, 4098 for a RoBERTa); the
    `tokenizer`, if given, is checked against the model and its `model_max_length` set to the new length. `seed`
    seeds the new parameters' initialisation. `kernel_feature_map="elu_plus_one"` gives the learned-kernel layers the
    fixed map elu + 1 instead (a baseline: nothing new to train). Raises `ConversionError` (a `ValueError`), before
    anything is built, for what cannot convert.
    """
    if attention not in ATTENTIONS:
        raise ConversionError(f"attention must be one of {ATTENTIONS}, got {attention!r}.")
    if isinstance(model_or_path, (str, Path)):
        source = load_source(Path(model_or_path))
        family = source.config.model_type
    else:
        source = model_or_path
        architecture = type(source).__name__
        family = check_source(source.config, architecture, f"The model ({architecture})")
    architecture = type(source).__name__
    if tokenizer is not None and family in VISION_FAMILIES:
        raise ConversionError("A ViT reads images, not tokens: pass no tokenizer (keep its image processor).")
    if tokenizer is not None:
        check_tokenizer(tokenizer, source.config)
    attention_fields = dict(attention_type=attention, projected_length=projected_length,
                            kernel_num_projections=kernel_num_projections, kernel_feature_map=kernel_feature_map)
    config = luna_config(source.config, family, attention_fields, max_position_embeddings)
    luna_class, _, _ = source_head(architecture, family)
    set_seed(seed)
    model = luna_class(config)
    converted = convert_state_dict(source, architecture, family, config)
    missing, unexpected = model.load_state_dict(converted, strict=False)
    unfilled = [name for name in missing if not is_new_attention_parameter(name, attention)]
    if unexpected or unfilled:
        raise ConversionError(f"Converted tensors without a place: {unexpected}; places without a tensor: {unfilled}")
    model.tie_weights()
    if tokenizer is not None:
        tokenizer.model_max_length = config.max_sequence_length
    return model.eval()


def load_processor(path, source_config):
    """What prepares a source folder's inputs: its image processor (a ViT; None with a warning if it has none), else
    its tokenizer (`load_tokenizer`)."""
    if source_config.model_type not in VISION_FAMILIES:
        return load_tokenizer(path, source_config)
    if not (Path(path) / "preprocessor_config.json").is_file():
        logger.warning("%s has no image processor (preprocessor_config.json): the Luna folder will have none.", path)
        return None
    return AutoImageProcessor.from_pretrained(path)


def load_tokenizer(path, source_config):
    """A source folder's tokenizer, checked against its model; None (with a warning) if the folder has none."""
    if not any((Path(path) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt",
                                                          "vocab.json")):  # fmt: skip
        logger.warning("%s has no tokenizer: the Luna folder will have none.", path)
        return None
    tokenizer = AutoTokenizer.from_pretrained(path)
    check_tokenizer(tokenizer, source_config)
    return tokenizer


def save_folder(model, tokenizer, output_dir, overwrite: bool = False, write_readme=None) -> Path:
    """Save `model` (and `tokenizer`, or an image processor, and `write_readme(folder)`'s card) to `output_dir`
    through a staging folder beside it, renamed into place only once complete and reloaded to the same tensors: an
    interrupted or failed save leaves no half-written folder."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise ConversionError(f"{output_dir} exists; pass overwrite=True (--overwrite_output_dir) to replace it.")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if write_readme is not None:
            write_readme(staging)
        reloaded = type(model).from_pretrained(staging).state_dict()
        differing = [name for name, tensor in model.state_dict().items()
                     if not torch.equal(reloaded[name], tensor.detach().cpu())]  # fmt: skip
        if differing:
            raise ConversionError(f"The saved folder does not reload to the model's tensors: {differing}")
        if output_dir.exists():
            shutil.rmtree(output_dir)
        staging.rename(output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output_dir


__all__ = [
    "ConversionError",
    "NEW_ATTENTION_PARAMETERS",
    "SUPPORTED_ARCHITECTURES",
    "TRANSFERRED_PARAMETERS",
    "convert_to_luna",
    "is_new_attention_parameter",
    "load_processor",
    "save_folder",
    "is_transferred_parameter",
]

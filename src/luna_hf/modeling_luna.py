# Copyright 2026 The luna-hf authors. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""PyTorch Luna model (Ma et al., 2021, "Luna: Linear Unified Nested Attention"): embeddings, layers, the encoder
`LunaModel` and its heads.

Each layer packs the token states X into a short sequence P with one attention (P attends to X, cost n*l), unpacks
it with a second (X attends to the packed P, cost n*l), and hands the packed P to the next layer. The computation
follows the authors' fairseq code (`luna_bert`); see docs/architecture.md for every decision. The attention kernels
are in `modeling_luna_attention.py`, the causal decoder (`LunaForCausalLM`) in `modeling_luna_causal.py`.

The files are copied next to saved checkpoints for `trust_remote_code`: they import only torch, transformers and
their siblings (`configuration_luna.py`, `transformers_compat.py` and each other), with one-dot relative imports.
Each file imports every sibling it needs directly: some transformers releases (5.9 among them) copy into their module
cache a remote-code file's own relative imports, not theirs.
"""

import json
import shutil
from dataclasses import dataclass
from functools import wraps
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers.activations import ACT2FN, gelu
from transformers.loss.loss_utils import fixed_cross_entropy
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    ImageClassifierOutput,
    MaskedLMOutput,
    ModelOutput,
    MultipleChoiceModelOutput,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)
from transformers.modeling_utils import PreTrainedModel
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs
from transformers.utils.generic import can_return_tuple

from .configuration_luna import LunaConfig
from .modeling_luna_attention import (
    LearnedKernelAttention,
    LearnedKernelFeatureMap,
    LunaPackAttention,
    LunaUnpackAttention,
)
from .modeling_luna_vision import LunaPatchEmbeddings
from .transformers_compat import OutputRecorder, capture_outputs, create_bidirectional_mask, init, is_tracing

# Saved folders name every Auto class, not only the saved head's, so that `AutoModel`, every head and every pipeline
# load any Luna folder with `trust_remote_code=True` (transformers itself writes only the saved class's entry).
LUNA_AUTO_MAP = {
    "AutoConfig": "configuration_luna.LunaConfig",
    "AutoModel": "modeling_luna.LunaModel",
    "AutoModelForMaskedLM": "modeling_luna.LunaForMaskedLM",
    "AutoModelForSequenceClassification": "modeling_luna.LunaForSequenceClassification",
    "AutoModelForTokenClassification": "modeling_luna.LunaForTokenClassification",
    "AutoModelForMultipleChoice": "modeling_luna.LunaForMultipleChoice",
    "AutoModelForQuestionAnswering": "modeling_luna.LunaForQuestionAnswering",
    "AutoModelForImageClassification": "modeling_luna.LunaForImageClassification",
    "AutoModelForCausalLM": "modeling_luna_causal.LunaForCausalLM",
}
# Every file of the model's code. transformers copies only the saved class's file and what it imports, so a folder
# saved from an encoder would lack the causal decoder's file that `auto_map` names: `save_pretrained` adds the rest.
LUNA_CODE_FILES = (
    "configuration_luna.py",
    "transformers_compat.py",
    "modeling_luna.py",
    "modeling_luna_attention.py",
    "modeling_luna_causal.py",
    "modeling_luna_vision.py",
)


def save_with_code(save_pretrained, model, save_directory, auto_map: dict, code_files, *args, **kwargs) -> None:
    """`save_pretrained` (the transformers method, bound) with a complete `auto_map` and every file of the model's
    code: transformers copies only the saved class's file and what it imports."""
    model.config.auto_map = dict(auto_map)
    save_pretrained(save_directory, *args, **kwargs)
    if model._auto_class is not None:  # transformers has written the remote code: complete it
        code_directory = Path(__file__).parent
        for name in code_files:
            if (code_directory / name).is_file() and not (Path(save_directory) / name).is_file():
                shutil.copyfile(code_directory / name, Path(save_directory) / name)


# Tensors that luna-hf moved (December 2026): a folder saved before then would load with them re-initialised.
MOVED_TENSORS = {"lm_head.bias": "lm_head.decoder.bias", "luna.pooler.": "classifier.pooler."}


def refuse_moved_tensors(folder) -> None:
    """Stop, with the one-time fix, before a local folder saved by an older luna-hf loads with re-initialised weights
    (the LM head's bias and the learned P poolers moved). Folders on the Hub are not inspected."""
    names = set()
    for index in Path(str(folder)).glob("*.safetensors.index.json"):
        names |= set(json.loads(index.read_text())["weight_map"])
    for shard in Path(str(folder)).glob("*.safetensors"):
        with safe_open(shard, framework="pt") as weights:
            names |= set(weights.keys())
    moved = sorted(name for name in names for old in MOVED_TENSORS if name.startswith(old))
    if moved:
        raise ValueError(
            f"{folder} was saved by luna-hf before December 2026: its tensors {moved} have moved "
            f"({', '.join(f'{old}* -> {new}*' for old, new in MOVED_TENSORS.items())}), and loading it now would "
            "re-initialise them. Rename them once, then load again:\n"
            "    from safetensors.torch import load_file, save_file\n"
            f"    state = load_file('{folder}/model.safetensors')\n"
            "    if 'lm_head.bias' in state: state.setdefault('lm_head.decoder.bias', state.pop('lm_head.bias'))\n"
            "    state = {k.replace('luna.pooler.', 'classifier.pooler.', 1): v for k, v in state.items()}\n"
            f"    save_file(state, '{folder}/model.safetensors', metadata={{'format': 'pt'}})\n"
            "(docs/conversion.md, 'Folders saved by earlier luna-hf versions'; for remote code also copy the current "
            "modeling_luna.py and transformers_compat.py into the folder)."
        )


@dataclass
class LunaModelOutput(ModelOutput):
    r"""
    last_hidden_state (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`):
        Token states X of the last layer.
    pooler_output (`torch.FloatTensor` of shape `(batch_size, hidden_size)`):
        Sentence representation chosen by `config.classifier_pooling`: the mean of the final P over each row's valid
        slots (`"packed_mean"`), the mean of the real tokens' states (`"mean"`), else the first real token's state
        (`"cls"`; also for the learned P poolings, whose parameters belong to the sequence heads' `classifier.pooler`,
        which apply them on top of it).
    packed_hidden_state (`torch.FloatTensor` of shape `(batch_size, packed_length, hidden_size)`):
        Packed sequence P of the last layer (`packed_length` = `projected_length`, or less with dynamic projection).
        With `attention_type="learned_kernel"` there is no P: this, `packed_attention_mask`, `packed_hidden_states`
        and `pack_attentions` are None, and asking for the last two raises a `ValueError`.
    packed_attention_mask (`torch.LongTensor` of shape `(batch_size, packed_length)`):
        1 for the slots of P that a row uses, 0 for those beyond its length (dynamic projection).
    packed_hidden_states (`tuple(torch.FloatTensor)`, returned with `output_packed_hidden_states=True`):
        P after the embeddings and after each layer, `num_hidden_layers + 1` tensors.
    pack_attentions (`tuple(torch.FloatTensor)`, returned with `output_attentions=True` and eager attention):
        Pack attention maps (P over X), `(batch_size, num_heads, packed_length, sequence_length)` per layer.
    hidden_states (`tuple(torch.FloatTensor)`, returned with `output_hidden_states=True`):
        X after the embeddings and after each layer.
    attentions (`tuple(torch.FloatTensor)`, returned with `output_attentions=True` and eager attention):
        Unpack attention maps (X over P), `(batch_size, num_heads, sequence_length, packed_length)` per layer. With
        `attention_type="learned_kernel"` (any attention implementation), the explicit normalised maps A of the
        linear attention, `(batch_size, num_heads, sequence_length, sequence_length)`: O(n^2), for debugging.
    """

    # The order of the tuple that `return_dict=False` gives (None entries dropped): [0] the token states and [1] the
    # pooled output for both attentions, as BERT's and RoBERTa's; `attentions` last.
    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    packed_hidden_state: torch.FloatTensor | None = None
    packed_attention_mask: torch.LongTensor | None = None
    packed_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    pack_attentions: tuple[torch.FloatTensor, ...] | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


def classification_loss(model, labels, logits, **kwargs) -> torch.Tensor:
    """The sequence and image heads' loss: by `config.problem_type` (decided as transformers decides it when None),
    transformers' cross-entropy for single-label classification, else `float_label_loss`."""
    config = model.config
    if config.problem_type is None:
        integer = not (labels.is_floating_point() or labels.is_complex())
        config.problem_type = ("regression" if config.num_labels == 1 else
                               "single_label_classification" if integer else "multi_label_classification")  # fmt: skip
    if config.problem_type == "single_label_classification":
        return model.loss_function(labels, logits, config, **kwargs)
    return float_label_loss(logits, labels, config.problem_type, kwargs.get("num_items_in_batch"))


def float_label_loss(logits, labels, problem_type: str, num_items_in_batch=None) -> torch.Tensor:
    """The regression (MSE) and multi-label (BCE) losses over the labels that are not -100 (an unknown label, skipped
    as the cross-entropy losses skip it), summed and divided by the Trainer's count of such labels across the
    accumulated micro-batches (`num_items_in_batch`, which transformers' own MSE and BCE losses ignore while the
    Trainer skips its division by the accumulation steps), else by this batch's count: with no -100, the mean
    transformers computes."""
    labels = labels.to(logits.device, logits.dtype)
    logits = logits.reshape(labels.shape)  # (batch, 1) logits for (batch,) regression targets
    if problem_type == "regression":
        per_label = nn.functional.mse_loss(logits, labels, reduction="none")
    else:
        per_label = nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    known = labels != -100
    count = known.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    return per_label[known].sum() / torch.as_tensor(count, device=logits.device)


class LunaDropout(nn.Dropout):
    """`nn.Dropout` that keeps a 1-byte mask for the backward pass (`torch.native_dropout`), where
    `nn.functional.dropout` on CPU keeps a 4-byte one: the layer's residual dropouts are n x d each."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return input
        return torch.native_dropout(input, self.p, True)[0]


class LunaEmbeddings(nn.Module):
    """Token states X as in RoBERTa (tokens + learned positions, LayerNorm, dropout) and the first layer's P (nested
    attention; the learned-kernel attention has no P and gets None). A converted BERT adds its token types and numbers
    positions from 0 (`config.type_vocab_size`, `config.position_numbering`)."""

    def __init__(self, config: LunaConfig):
        super().__init__()
        self.padding_idx = config.pad_token_id
        self.position_numbering = config.position_numbering
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=self.padding_idx)
        # BERT's positions have no padding row: its row pad_token_id (0) is position 0, which must keep its gradient.
        position_padding_idx = self.padding_idx if config.position_numbering == "padding_offset" else None
        self.position_embeddings = nn.Embedding(
            config.max_position_embeddings, config.hidden_size, padding_idx=position_padding_idx
        )
        self.token_type_embeddings = None
        if config.type_vocab_size > 0:
            self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        # P is itself a learned positional embedding (paper §3.1): no position term, its own LayerNorm.
        self.projected_embeddings = self.projected_layer_norm = None
        if config.attention_type == "nested":
            self.projected_embeddings = nn.Parameter(torch.empty(config.projected_length, config.hidden_size))
            self.projected_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = LunaDropout(config.hidden_dropout_prob)

    def forward(self, input_ids, inputs_embeds, token_mask, slot_mask, token_type_ids=None):
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        batch_size = inputs_embeds.shape[0]
        if self.position_numbering == "padding_offset":
            # fairseq's `make_positions` read from the attention mask, not from pad ids: real tokens are numbered from
            # padding_idx + 1, padded positions take the (zero) padding row, whatever id or embedding fills them.
            position_ids = torch.cumsum(token_mask, dim=1) * token_mask + self.padding_idx
        else:  # BERT's 0..n-1 over the real tokens; padded positions take row 0 (their states are zeroed below)
            position_ids = (torch.cumsum(token_mask, dim=1) - 1).clamp(min=0) * token_mask
        if self.token_type_embeddings is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(token_mask)
            # BERT's order of the sums, so that a converted BERT's embeddings are BERT's to the last bit.
            inputs_embeds = inputs_embeds + self.token_type_embeddings(token_type_ids)
        hidden_states = self.layer_norm(inputs_embeds + self.position_embeddings(position_ids))
        hidden_states = self.dropout(hidden_states) * token_mask.unsqueeze(-1).to(hidden_states.dtype)
        if self.projected_embeddings is None:
            return hidden_states, None

        packed_length = slot_mask.shape[1]
        packed_states = self.projected_layer_norm(self.projected_embeddings[:packed_length])
        packed_states = packed_states.unsqueeze(0).expand(batch_size, -1, -1)
        # Dropout per row, then zero the masked slots, as the authors do.
        packed_states = self.dropout(packed_states) * slot_mask.unsqueeze(-1).to(packed_states.dtype)
        return hidden_states, packed_states


GELU_APPROXIMATIONS = {"gelu": "none", "gelu_pytorch_tanh": "tanh"}  # hidden_act -> nn.functional.gelu's


class GeluThenLinear(torch.autograd.Function):
    """`linear(gelu(x))` that keeps only x for the backward pass and recomputes gelu(x) there.

    x and gelu(x) are a layer's widest tensors (n x intermediate_size); gelu is cheap to recompute, so the
    feed-forward block keeps one of them instead of both. The backward pass uses aten's own gelu_backward.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, approximate: str):
        ctx.save_for_backward(x, weight)
        ctx.approximate = approximate
        return nn.functional.linear(nn.functional.gelu(x, approximate=approximate), weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        x, weight = ctx.saved_tensors
        activated = nn.functional.gelu(x, approximate=ctx.approximate).to(grad_output.dtype)  # autocast: its dtype
        grad_rows = grad_output.reshape(-1, grad_output.shape[-1])
        grad_weight = grad_rows.T @ activated.reshape(-1, activated.shape[-1])
        grad_activated = (grad_output @ weight.to(grad_output.dtype)).to(x.dtype)
        grad_x = torch.ops.aten.gelu_backward(grad_activated, x, approximate=ctx.approximate)
        return grad_x, grad_weight.to(weight.dtype), grad_rows.sum(0).to(weight.dtype), None


class LunaLayer(GradientCheckpointingLayer):
    """One Luna layer (paper Eq. 6, post-LayerNorm): pack, unpack, residuals on X and on P, feed-forward on X only.

    The attention is chosen here by `config.attention_type`: `"nested"`, Luna's pack and unpack attentions
    (`LunaPackAttention`, then `LunaUnpackAttention`), or `"learned_kernel"`, one `LearnedKernelAttention` of X over
    X. Everything else is the same; the learned-kernel layer has no P, and takes and returns `packed_states=None`.
    """

    def __init__(self, config: LunaConfig):
        super().__init__()
        self.attention_type = config.attention_type
        if config.attention_type == "nested":
            self.pack_attention = LunaPackAttention(config)
            self.unpack_attention = LunaUnpackAttention(config)
        else:
            self.attention = LearnedKernelAttention(config)
        self.attention_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.packed_layer_norm = None
        if config.attention_type == "nested":
            self.packed_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.add_feed_forward(config)
        self.normalize_before = config.normalize_before

    def add_feed_forward(self, config) -> None:
        """The feed-forward block and the residual dropout, shared by the encoder, causal and decoder layers."""
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.activation = ACT2FN[config.hidden_act]
        self.gelu_approximation = GELU_APPROXIMATIONS.get(config.hidden_act)  # None: no recomputation
        self.activation_dropout = nn.Dropout(config.activation_dropout)
        self.ffn_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = LunaDropout(config.hidden_dropout_prob)

    def forward(
        self,
        hidden_states: torch.Tensor,
        packed_states: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        unpack_mask: torch.Tensor | None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """X, P (None for the learned-kernel attention), the mask of X as keys (nested: the pack attention's, from
        `create_bidirectional_mask`; learned kernel: the (batch, n) token mask) and the unpack attention's mask of P
        (None for the learned kernel). Returns the new X and P."""
        if self.normalize_before:
            return self.pre_layer_norm_forward(hidden_states, packed_states, attention_mask, unpack_mask, **kwargs)
        attended, packed_context = self.attend(hidden_states, packed_states, attention_mask, unpack_mask, **kwargs)
        if packed_states is not None:
            packed_states = self.packed_layer_norm(packed_states + self.dropout(packed_context))
        hidden_states = self.attention_layer_norm(hidden_states + self.dropout(attended))
        hidden_states = self.ffn_layer_norm(hidden_states + self.dropout(self.feed_forward(hidden_states)))
        return hidden_states, packed_states

    def pre_layer_norm_forward(self, hidden_states, packed_states, attention_mask, unpack_mask, **kwargs):
        """`config.normalize_before` (the authors' pre-LN layer): normalise each sub-layer's input, not its output."""
        normalized = self.attention_layer_norm(hidden_states)
        normalized_packed = self.packed_layer_norm(packed_states) if packed_states is not None else None
        attended, packed_context = self.attend(normalized, normalized_packed, attention_mask, unpack_mask, **kwargs)
        if packed_states is not None:
            packed_states = packed_states + self.dropout(packed_context)
        hidden_states = hidden_states + self.dropout(attended)
        hidden_states = hidden_states + self.dropout(self.feed_forward(self.ffn_layer_norm(hidden_states)))
        return hidden_states, packed_states

    def attend(self, hidden_states, packed_states, attention_mask, unpack_mask, **kwargs):
        """X's attention output and the packed context (None for the learned-kernel attention)."""
        if self.attention_type == "learned_kernel":
            attended, _ = self.attention(hidden_states, attention_mask, **kwargs)
            return attended, None
        # Pack: Y_P = Attn(P, X). Unpack: Y_X = Attn(X, Y_P), with keys/values from the raw Y_P.
        packed_context, _ = self.pack_attention(packed_states, hidden_states, attention_mask, **kwargs)
        unpacked, _ = self.unpack_attention(hidden_states, packed_context, unpack_mask, **kwargs)
        return unpacked, packed_context

    def feed_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        intermediate = self.fc1(hidden_states)
        # Training: recompute gelu in the backward pass rather than keep it (a plain nn.Linear only, so that
        # adapters or quantized layers replacing fc2 keep their own forward).
        approximate = self.gelu_approximation
        if torch.is_grad_enabled() and approximate and self.activation_dropout.p == 0.0 and type(self.fc2) is nn.Linear:
            if not is_tracing(intermediate):
                return GeluThenLinear.apply(intermediate, self.fc2.weight, self.fc2.bias, approximate)
        return self.fc2(self.activation_dropout(self.activation(intermediate)))


class LunaPackedMaxPooler(nn.Module):
    """`classifier_pooling="packed_max"` (the authors' `pooling_classification_head`): a linear map of the final P,
    then the maximum over each row's valid slots."""

    def __init__(self, config: LunaConfig):
        super().__init__()
        self.in_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, first_token, packed_states, slot_mask) -> torch.Tensor:
        projected = self.in_proj(packed_states)
        return projected.masked_fill(slots_to_pool(slot_mask).unsqueeze(-1) == 0, float("-inf")).amax(dim=1)


class LunaPackedAttentionPooler(nn.Module):
    """`classifier_pooling="packed_attention"` (the authors' `attention_classification_head`): the first real token's
    state attends over the valid slots of the final P (multi-head, no dropout), then LayerNorm."""

    def __init__(self, config: LunaConfig):
        super().__init__()
        self.attention = nn.MultiheadAttention(config.hidden_size, config.num_attention_heads, batch_first=True)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, first_token, packed_states, slot_mask) -> torch.Tensor:
        attended, _ = self.attention(
            first_token[:, None],
            packed_states,
            packed_states,
            key_padding_mask=slots_to_pool(slot_mask) == 0,
            need_weights=False,
        )
        return self.layer_norm(attended[:, 0])


def slots_to_pool(slot_mask: torch.Tensor) -> torch.Tensor:
    """The valid slots, and the first slot of a fully padded row (which has none), so that its output stays finite."""
    return torch.cat([torch.ones_like(slot_mask[:, :1]), slot_mask[:, 1:]], dim=1)


LEARNED_POOLERS = {"packed_max": LunaPackedMaxPooler, "packed_attention": LunaPackedAttentionPooler}


class LunaPreTrainedModel(PreTrainedModel):
    config: LunaConfig
    config_class = LunaConfig
    base_model_prefix = "luna"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LunaEmbeddings", "LunaPatchEmbeddings", "LunaLayer"]
    _supports_sdpa = True
    _supports_attention_backend = True
    # Recorded outputs are inserted in this order; transformers expects `hidden_states`, `attentions` last.
    _can_record_outputs = {
        "packed_hidden_states": [
            OutputRecorder((LunaEmbeddings, LunaPatchEmbeddings), index=1),
            OutputRecorder(LunaLayer, index=1),
        ],
        "pack_attentions": OutputRecorder(LunaPackAttention, index=1),
        "hidden_states": LunaLayer,
        # One recorder, not a list: transformers 5.9 reads a list of two under "attentions" as (self, cross).
        "attentions": OutputRecorder((LunaUnpackAttention, LearnedKernelAttention), index=1),
    }

    def save_pretrained(self, save_directory, *args, **kwargs):
        save_with_code(super().save_pretrained, self, save_directory, LUNA_AUTO_MAP, LUNA_CODE_FILES, *args, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        refuse_moved_tensors(pretrained_model_name_or_path)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, (LunaEmbeddings, LunaPatchEmbeddings)) and module.projected_embeddings is not None:
            init.normal_(module.projected_embeddings, mean=0.0, std=self.config.initializer_range)
        if isinstance(module, LunaPatchEmbeddings):  # ViT's initialisation
            for parameter in (module.cls_token, module.position_embeddings, module.projection.weight):
                init.trunc_normal_(parameter, mean=0.0, std=self.config.initializer_range)
            init.zeros_(module.projection.bias)
        if isinstance(module, LearnedKernelFeatureMap):
            # The authors' listing: W ~ N(0, 1/d), b = 0; psi's layers as PyTorch's nn.Linear default,
            # U(+-1/sqrt(fan_in)) (fan_in 1 for the hidden layer, kernel_mlp_hidden for the output layer).
            init.normal_(module.projection_weight, mean=0.0, std=module.head_dim**-0.5)
            init.zeros_(module.projection_bias)
            init.uniform_(module.channel_hidden_weight, -1.0, 1.0)
            init.uniform_(module.channel_hidden_bias, -1.0, 1.0)
            bound = module.channel_output_weight.shape[1] ** -0.5
            init.uniform_(module.channel_output_weight, -bound, bound)
            init.uniform_(module.channel_output_bias, -bound, bound)
            if module.envelope_scale is not None:
                init.zeros_(module.envelope_scale)


def pack_attentions_follow_output_attentions(forward):
    """`output_attentions=True` returns the pack maps too (recorded under their own key, `pack_attentions`). The
    learned-kernel attention reads the flag itself to build its explicit maps, and has no P: asking for its packed
    states or pack maps is an error."""

    @wraps(forward)
    def wrapper(self, *args, **kwargs):
        output_attentions = kwargs.get("output_attentions", self.config.output_attentions)
        if self.config.attention_type == "nested":
            kwargs.setdefault("output_pack_attentions", output_attentions)
            return forward(self, *args, **kwargs)
        for name in ("output_packed_hidden_states", "output_pack_attentions"):
            if kwargs.get(name, getattr(self.config, name, False)):
                raise ValueError(
                    f'{name}=True asks for Luna\'s packed sequence P, which attention_type="learned_kernel" does not '
                    "have: use output_hidden_states / output_attentions (the token states and the attention maps)."
                )
        kwargs["output_attentions"] = output_attentions
        return forward(self, *args, **kwargs)

    return wrapper


class LunaModel(LunaPreTrainedModel):
    def __init__(self, config: LunaConfig):
        super().__init__(config)
        self.config = config
        self.gradient_checkpointing = False
        self.embeddings = LunaPatchEmbeddings(config) if config.image_size else LunaEmbeddings(config)
        self.layers = nn.ModuleList([LunaLayer(config) for _ in range(config.num_hidden_layers)])
        if config.normalize_before:  # pre-LN: the last layer's sums are normalised once more (authors' final LNs)
            self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
            if config.attention_type == "nested":
                self.packed_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.projection if self.config.image_size else self.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        if self.config.image_size:
            self.embeddings.projection = value
        else:
            self.embeddings.word_embeddings = value

    @pack_attentions_follow_output_attentions
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        interpolate_pos_encoding: bool = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> LunaModelOutput:
        r"""
        input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`): token ids.
        attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*): 1 for real tokens,
            0 for padding (left or right). Padding is excluded from the pack attention and shortens the row's share
            of P, and positions count the real tokens only, so the real tokens' outputs do not depend on what fills
            the padded positions. Without it every position is a real token.
        inputs_embeds (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`, *optional*):
            token embeddings instead of `input_ids`.
        token_type_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*): BERT's segment ids
            (0 for the first sentence, 1 for the second), for models with `config.type_vocab_size > 0` (a converted
            BERT); all 0 when omitted.
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`): the images, for a
            model with `config.image_size` (instead of the other inputs), as its image processor prepares them.
        interpolate_pos_encoding (`bool`, defaults to `False`): images of another size than `config.image_size`
            (whole patches) read the learned positions interpolated to their grid, as ViT's.
        """
        if self.config.image_size:
            hidden_states, packed_states, token_mask, slot_mask = self.embed_image(
                pixel_values, interpolate_pos_encoding, input_ids, inputs_embeds
            )
        else:
            token_mask = self.validate_inputs(input_ids, attention_mask, inputs_embeds)
            if token_type_ids is not None and self.config.type_vocab_size == 0:
                raise ValueError(
                    "token_type_ids were given, but this model has no token-type embeddings (config.type_vocab_size="
                    "0, as RoBERTa's tokenizer and every Luna pretrained from scratch): leave them out."
                )
            slot_mask = self.projected_slot_mask(token_mask) if self.config.attention_type == "nested" else None
            hidden_states, packed_states = self.embeddings(
                input_ids, inputs_embeds, token_mask, slot_mask, token_type_ids
            )

        if self.config.attention_type == "nested":
            # Pack: P (queries) over X (keys), X's padding masked. Unpack: X over P, P's unused slots masked.
            key_mask = create_bidirectional_mask(
                config=self.config,
                inputs_embeds=packed_states,
                attention_mask=token_mask,
                encoder_hidden_states=hidden_states,
            )
            unpack_mask = create_bidirectional_mask(
                config=self.config,
                inputs_embeds=hidden_states,
                attention_mask=slot_mask,
                encoder_hidden_states=packed_states,
            )
        else:  # the learned-kernel attention zeroes the padded keys' features: it takes the token mask as it is
            key_mask, unpack_mask = token_mask, None
        for layer in self.layers:
            hidden_states, packed_states = layer(hidden_states, packed_states, key_mask, unpack_mask, **kwargs)
        if self.config.normalize_before:
            hidden_states = self.layer_norm(hidden_states)
            if packed_states is not None:
                packed_states = self.packed_layer_norm(packed_states)

        return LunaModelOutput(
            last_hidden_state=hidden_states,
            packed_hidden_state=packed_states,
            pooler_output=self.pool(hidden_states, packed_states, token_mask, slot_mask),
            packed_attention_mask=slot_mask,
        )

    def embed_image(self, pixel_values, interpolate_pos_encoding, input_ids, inputs_embeds):
        """X, P, the token mask (every patch is real) and P's slot mask of a batch of images."""
        if pixel_values is None or input_ids is not None or inputs_embeds is not None:
            raise ValueError("This model reads images (config.image_size is set): pass pixel_values only, as its "
                             "image processor prepares them.")  # fmt: skip
        height, width = pixel_values.shape[-2:]
        patches = (height // self.config.patch_size) * (width // self.config.patch_size)
        token_mask = torch.ones(pixel_values.shape[0], 1 + patches, dtype=torch.long, device=pixel_values.device)
        slot_mask = self.projected_slot_mask(token_mask) if self.config.attention_type == "nested" else None
        hidden_states, packed_states = self.embeddings(pixel_values, slot_mask, interpolate_pos_encoding)
        return hidden_states, packed_states, token_mask, slot_mask

    def validate_inputs(self, input_ids, attention_mask, inputs_embeds) -> torch.Tensor:
        """Check the inputs and return the token mask (1 = real token)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds.")
        if input_ids is not None and (input_ids.is_floating_point() or input_ids.is_complex()):
            raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}.")
        shape = input_ids.shape if input_ids is not None else inputs_embeds.shape[:-1]
        if len(shape) != 2 or shape[0] == 0 or shape[1] == 0:
            raise ValueError(
                f"Luna expects a non-empty batch of shape (batch_size, sequence_length), got {tuple(shape)}."
            )
        if shape[1] > self.config.max_sequence_length:
            raise ValueError(
                f"Input length {shape[1]} exceeds this model's maximum of {self.config.max_sequence_length} tokens "
                f"(max_position_embeddings={self.config.max_position_embeddings}). Truncate the input, e.g. "
                f"tokenizer(..., truncation=True, max_length={self.config.max_sequence_length})."
            )
        device = input_ids.device if input_ids is not None else inputs_embeds.device
        if attention_mask is None:
            if input_ids is not None:  # padding read as tokens: transformers' warning, as RoBERTa gives it
                self.warn_if_padding_and_no_attention_mask(input_ids, attention_mask)
            return torch.ones(shape, dtype=torch.long, device=device)
        if attention_mask.shape != shape:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {tuple(shape)}.")
        return attention_mask.long()

    def projected_slot_mask(self, token_mask: torch.Tensor) -> torch.Tensor:
        """Which slots of P each row uses: all l, or, with dynamic projection, the first min(l, row length)."""
        batch_size = token_mask.shape[0]
        if not self.config.dynamic_projection:
            return token_mask.new_ones(batch_size, self.config.projected_length)
        lengths = token_mask.sum(dim=1)
        if is_tracing(token_mask):
            # torch.export / torch.compile / ONNX: cutting P needs the batch's longest length as a Python int (a
            # data-dependent shape), so keep all l slots; those beyond a row's length are masked, which leaves every
            # real token's output as it is with the cut.
            packed_length = self.config.projected_length
        else:
            # At least one slot, so that a batch of fully padded rows still has a (masked) P.
            packed_length = max(1, min(self.config.projected_length, int(lengths.max())))
        slots = torch.arange(packed_length, device=token_mask.device)
        return (slots.unsqueeze(0) < lengths.unsqueeze(1)).long()

    def pool(self, hidden_states, packed_states, token_mask, slot_mask) -> torch.Tensor:
        """The mean of P's valid slots (`"packed_mean"`), the mean of the real tokens (`"mean"`), else the first real
        token's state: `"cls"`, and what the sequence heads' learned poolings read. The first real token, not the
        first position, so that a left-padded row pools its own [CLS] rather than a padding position."""
        if self.config.classifier_pooling == "packed_mean":
            weights = slot_mask.unsqueeze(-1).to(packed_states.dtype)
            return (packed_states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
        if self.config.classifier_pooling == "mean":
            weights = token_mask.unsqueeze(-1).to(hidden_states.dtype)
            return (hidden_states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
        first_real = token_mask.argmax(dim=1)  # 0 for a fully padded row
        return hidden_states[torch.arange(hidden_states.shape[0], device=hidden_states.device), first_real]


class LunaLMHead(nn.Module):
    """RoBERTa's masked-LM head: dense, GELU, LayerNorm, then the decoder (its weight tied to the token embeddings
    unless `tie_word_embeddings=False`). The decoder's bias is the head's only bias (RoBERTa keeps a second copy that
    a vocabulary resize leaves behind when the head is untied), so `resize_token_embeddings` resizes all of it."""

    def __init__(self, config: LunaConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.layer_norm(gelu(self.dense(features))))


class LunaClassificationHead(nn.Module):
    """RoBERTa's sentence head (dropout, dense, tanh, dropout, projection) on the pooled representation.

    A learned P pooling (`classifier_pooling` `"packed_max"` or `"packed_attention"`) is part of this head, not of
    `LunaModel`: it is new when a classifier is made from a pretrained encoder, like the rest of the head, so tools
    that train and save the classifier alone (peft's `modules_to_save`, which names `classifier`) keep it too.
    """

    def __init__(self, config: LunaConfig, num_outputs: int):
        super().__init__()
        pooler_class = LEARNED_POOLERS.get(config.classifier_pooling)
        self.pooler = pooler_class(config) if pooler_class is not None else None
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, num_outputs)

    def forward(self, outputs: LunaModelOutput) -> torch.Tensor:
        pooled = outputs.pooler_output
        if self.pooler is not None:
            pooled = self.pooler(outputs.pooler_output, outputs.packed_hidden_state, outputs.packed_attention_mask)
        return self.out_proj(self.dropout(torch.tanh(self.dense(self.dropout(pooled)))))


class LunaForMaskedLM(LunaPreTrainedModel):
    _tied_weights_keys = {"lm_head.decoder.weight": "luna.embeddings.word_embeddings.weight"}

    def __init__(self, config: LunaConfig):
        super().__init__(config)
        self.luna = LunaModel(config)
        self.lm_head = LunaLMHead(config)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head.decoder

    def set_output_embeddings(self, new_embeddings):
        self.lm_head.decoder = new_embeddings

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MaskedLMOutput:
        r"""labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*): token ids to predict,
        -100 where no prediction is scored. With `config.sparse_prediction`, the logits are then those of the
        labelled positions only, `(number of labelled tokens, vocab_size)`."""
        outputs = self.luna(input_ids, attention_mask, inputs_embeds, token_type_ids, return_dict=True, **kwargs)
        hidden_states = outputs.last_hidden_state
        if self.config.sparse_prediction and labels is not None:
            # As ModernBERT: the head (n x vocab_size logits, a large share of a pretraining step) runs only where a
            # label is scored; the loss is the dense one.
            labels = labels.flatten().to(hidden_states.device)
            scored = labels != self.config.sparse_pred_ignore_index
            hidden_states, labels = hidden_states.flatten(0, 1)[scored], labels[scored]
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size, **kwargs)
        return MaskedLMOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


class LunaForSequenceClassification(LunaPreTrainedModel):
    def __init__(self, config: LunaConfig):
        super().__init__(config)
        self.luna = LunaModel(config)
        self.classifier = LunaClassificationHead(config, config.num_labels)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SequenceClassifierOutput:
        r"""labels (`torch.Tensor` of shape `(batch_size,)`, *optional*): class ids, float targets for regression
        (`num_labels == 1`), or multi-hot floats for multi-label classification (`config.problem_type`)."""
        outputs = self.luna(input_ids, attention_mask, inputs_embeds, token_type_ids, return_dict=True, **kwargs)
        logits = self.classifier(outputs)
        loss = classification_loss(self, labels, logits, **kwargs) if labels is not None else None
        return SequenceClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


class LunaForMultipleChoice(LunaPreTrainedModel):
    def __init__(self, config: LunaConfig):
        super().__init__(config)
        self.luna = LunaModel(config)
        # One score per choice from the sentence head, as fairseq's sentence-ranking task does for RACE/CSQA.
        self.classifier = LunaClassificationHead(config, 1)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MultipleChoiceModelOutput:
        r"""input_ids (`torch.LongTensor` of shape `(batch_size, num_choices, sequence_length)`): one row per choice.
        labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*): index of the right choice."""
        num_choices = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        outputs = self.luna(
            input_ids.flatten(0, 1) if input_ids is not None else None,
            attention_mask.flatten(0, 1) if attention_mask is not None else None,
            inputs_embeds.flatten(0, 1) if inputs_embeds is not None else None,
            token_type_ids.flatten(0, 1) if token_type_ids is not None else None,
            return_dict=True,
            **kwargs,
        )
        logits = self.classifier(outputs).view(-1, num_choices)
        loss = None
        if labels is not None:
            # Summed and divided by num_items_in_batch under gradient accumulation, as the Trainer expects.
            loss = fixed_cross_entropy(logits, labels.to(logits.device), kwargs.get("num_items_in_batch"))
        return MultipleChoiceModelOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


class LunaForTokenClassification(LunaPreTrainedModel):
    def __init__(self, config: LunaConfig):
        super().__init__(config)
        self.luna = LunaModel(config)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> TokenClassifierOutput:
        r"""labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*): class id per token,
        -100 where no prediction is scored."""
        outputs = self.luna(input_ids, attention_mask, inputs_embeds, token_type_ids, return_dict=True, **kwargs)
        logits = self.classifier(self.dropout(outputs.last_hidden_state))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.config, **kwargs)
        return TokenClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


class LunaForQuestionAnswering(LunaPreTrainedModel):
    def __init__(self, config: LunaConfig):
        super().__init__(config)
        self.luna = LunaModel(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        start_positions: torch.LongTensor | None = None,
        end_positions: torch.LongTensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> QuestionAnsweringModelOutput:
        r"""start_positions, end_positions (`torch.LongTensor` of shape `(batch_size,)`, *optional*): answer span."""
        outputs = self.luna(input_ids, attention_mask, inputs_embeds, token_type_ids, return_dict=True, **kwargs)
        start_logits, end_logits = self.qa_outputs(outputs.last_hidden_state).unbind(dim=-1)
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = self.loss_function(start_logits, end_logits, start_positions, end_positions, **kwargs)
        return QuestionAnsweringModelOutput(
            loss=loss,
            start_logits=start_logits.contiguous(),
            end_logits=end_logits.contiguous(),
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


class LunaForImageClassification(LunaPreTrainedModel):
    """ViT's image classifier on Luna: a linear layer on the final [CLS] state (after the final LayerNorm). Needs
    `config.image_size`; a converted `ViTForImageClassification` keeps its classifier (`luna_hf.convert_to_luna`)."""

    main_input_name = "pixel_values"

    def __init__(self, config: LunaConfig):
        super().__init__(config)
        if not config.image_size:
            raise ValueError("LunaForImageClassification reads images: set config.image_size (with patch_size and "
                             "num_channels), or convert a ViT with luna_hf.convert_to_luna.")  # fmt: skip
        self.luna = LunaModel(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.FloatTensor | None = None,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> ImageClassifierOutput:
        r"""labels (`torch.Tensor` of shape `(batch_size,)`, *optional*): class ids (or float targets, as
        `LunaForSequenceClassification`'s)."""
        outputs = self.luna(pixel_values=pixel_values, interpolate_pos_encoding=interpolate_pos_encoding,
                            return_dict=True, **kwargs)  # fmt: skip
        logits = self.classifier(outputs.last_hidden_state[:, 0])
        loss = classification_loss(self, labels, logits, **kwargs) if labels is not None else None
        return ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


__all__ = [
    "LunaForImageClassification",
    "LunaForMaskedLM",
    "LunaForMultipleChoice",
    "LunaForQuestionAnswering",
    "LunaForSequenceClassification",
    "LunaForTokenClassification",
    "LunaModel",
    "LunaModelOutput",
    "LunaPreTrainedModel",
]

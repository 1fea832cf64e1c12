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
"""Luna's encoder-decoder model for translation (Ma et al., 2021, §4.2; the authors' fairseq `luna`):
`LunaSeq2SeqModel` and `LunaForConditionalGeneration`, with a constant-size cache for `generate()`.

The encoder is a stack of the encoder's `LunaLayer`s over fairseq-style embeddings. Each decoder layer runs Luna's
causal attention over the current packed sequence P, then a cross-attention: P packs the encoder output (P attends to
the source) and the decoder tokens unpack the result; the packed output also updates P (its own LayerNorm), which the
next decoder layer reads. The decoder's first P is the encoder's final P, so P holds only source information.
docs/seq2seq.md describes the model and its cache.

Copied next to saved checkpoints for `trust_remote_code`: it imports only torch, transformers and its siblings.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationMixin
from transformers.cache_utils import EncoderDecoderCache
from transformers.loss.loss_utils import fixed_cross_entropy
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import ModelOutput, Seq2SeqLMOutput, Seq2SeqModelOutput
from transformers.modeling_utils import PreTrainedModel
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs
from transformers.utils.generic import can_return_tuple

from .configuration_luna import LunaConfig  # noqa: F401  (imported by modeling_luna: see transformers_compat.py)
from .configuration_luna_seq2seq import LunaSeq2SeqConfig
from .modeling_luna import LunaDropout, LunaLayer, LunaModel, save_with_code
from .modeling_luna_attention import (
    TOKEN_COUNT,
    LunaCache,
    LunaCacheForGeneration,
    LunaCausalAttention,
    LunaPackAttention,
    LunaUnpackAttention,
)
from .modeling_luna_vision import LunaPatchEmbeddings  # noqa: F401  (imported by modeling_luna: as above)
from .transformers_compat import (
    CACHE_OUTPUT_NAME,
    create_bidirectional_mask,
    init,
    is_tracing,
    require_generation_support,
    take_cache_argument,
)

LUNA_SEQ2SEQ_AUTO_MAP = {
    "AutoConfig": "configuration_luna_seq2seq.LunaSeq2SeqConfig",
    "AutoModel": "modeling_luna_seq2seq.LunaSeq2SeqModel",
    "AutoModelForSeq2SeqLM": "modeling_luna_seq2seq.LunaForConditionalGeneration",
}
LUNA_SEQ2SEQ_CODE_FILES = (
    "configuration_luna.py",
    "configuration_luna_seq2seq.py",
    "modeling_luna.py",
    "modeling_luna_attention.py",
    "modeling_luna_seq2seq.py",
    "modeling_luna_vision.py",
    "transformers_compat.py",
)


@dataclass
class LunaSeq2SeqEncoderOutput(ModelOutput):
    r"""
    last_hidden_state (`torch.FloatTensor` of shape `(batch_size, source_length, hidden_size)`):
        The encoder's final token states.
    packed_hidden_state (`torch.FloatTensor` of shape `(batch_size, packed_length, hidden_size)`):
        The encoder's final P, the decoder's first P.
    packed_attention_mask (`torch.LongTensor` of shape `(batch_size, packed_length)`):
        1 for the slots of P a row uses, 0 for those beyond its source length (dynamic projection).
    hidden_states, packed_hidden_states (`tuple(torch.FloatTensor)`, returned with `output_hidden_states=True`):
        X and P after the embeddings and after each layer (`encoder_layers + 1` each; the last after the final
        LayerNorm of a pre-LN model).
    """

    last_hidden_state: torch.FloatTensor | None = None
    packed_hidden_state: torch.FloatTensor | None = None
    packed_attention_mask: torch.LongTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    packed_hidden_states: tuple[torch.FloatTensor, ...] | None = None


def requested(flag: str, kwargs: dict, config) -> bool:
    """An `output_*` flag from the call, else from the config."""
    return bool(kwargs.get(flag, getattr(config, flag, False)))


def refuse_attention_maps(kwargs: dict, config) -> None:
    """The translation model returns hidden states but no attention maps: asking for them is an error, not None."""
    if requested("output_attentions", kwargs, config):
        raise ValueError(
            "LunaForConditionalGeneration does not return attention maps (output_attentions=True): its decoder's "
            "causal attention never forms a token-by-token map. It returns output_hidden_states=True: "
            "encoder_hidden_states (and the encoder's packed_hidden_states from model.get_encoder()) and "
            "decoder_hidden_states. For the encoder's pack and unpack maps, load its layers in a LunaModel."
        )


def sinusoidal_embeddings(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """fairseq's sinusoids of `positions` (any shape, float32): [sin(p w_i), cos(p w_i)] with
    w_i = 10000^(-i / (dim / 2 - 1)), a zero column last when `dim` is odd."""
    half_dim = dim // 2
    frequencies = torch.exp(
        torch.arange(half_dim, dtype=torch.float, device=positions.device) * -(math.log(10000) / (half_dim - 1))
    )
    angles = positions.float().unsqueeze(-1) * frequencies
    embeddings = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
    return nn.functional.pad(embeddings, (0, dim % 2))


class LunaSeq2SeqPositions(nn.Module):
    """Token positions numbered as fairseq does (pad_token_id + 1, + 2, ... over the real tokens; padding takes
    pad_token_id, whose row is zero): sinusoidal, or learned (`position_embedding_type="learned"`)."""

    def __init__(self, config: LunaSeq2SeqConfig):
        super().__init__()
        self.padding_idx = config.pad_token_id
        self.dim = config.hidden_size
        self.embeddings = None
        if config.position_embedding_type == "learned":
            size = config.max_position_embeddings + config.pad_token_id + 1
            self.embeddings = nn.Embedding(size, config.hidden_size, padding_idx=config.pad_token_id)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.embeddings is not None:
            return self.embeddings(position_ids)
        embeddings = sinusoidal_embeddings(position_ids, self.dim)
        return embeddings.masked_fill((position_ids == self.padding_idx).unsqueeze(-1), 0.0).to(dtype)


class LunaSeq2SeqPreTrainedModel(PreTrainedModel):
    config: LunaSeq2SeqConfig
    config_class = LunaSeq2SeqConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LunaLayer", "LunaSeq2SeqDecoderLayer"]
    _supports_sdpa = True
    _supports_attention_backend = True
    _is_stateful = True  # the causal running sums cannot be rolled back

    def __init__(self, config: LunaSeq2SeqConfig, *args, **kwargs):
        require_generation_support(type(self).__name__)
        super().__init__(config, *args, **kwargs)

    def empty_cache(self) -> EncoderDecoderCache:
        """The decoder's causal running sums and its cross-attention's keys and values of the packed source."""
        return EncoderDecoderCache(LunaCache(self.config), LunaCache(self.config))

    def resize_token_embeddings(self, new_num_tokens=None, pad_to_multiple_of=None, mean_resizing=True):
        """As BART: the source and the target embeddings and the output layer all take the new size, tied or not
        (transformers resizes the input embeddings it gets from `get_input_embeddings`, the encoder's, only)."""
        embeddings = super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        decoder = getattr(self, self.base_model_prefix, self).decoder
        if decoder.embed_tokens is not embeddings:  # untied: the decoder has its own matrix
            decoder.embed_tokens = self._get_resized_embeddings(
                decoder.embed_tokens, embeddings.num_embeddings, mean_resizing=mean_resizing
            )
        return embeddings

    def save_pretrained(self, save_directory, *args, **kwargs):
        save_with_code(
            super().save_pretrained,
            self,
            save_directory,
            LUNA_SEQ2SEQ_AUTO_MAP,
            LUNA_SEQ2SEQ_CODE_FILES,
            *args,
            **kwargs,
        )

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        # The authors' fairseq initialisation: Xavier-uniform linear maps with zero biases (they use gain 1/sqrt(2) on
        # the attentions' query, key and value projections), N(0, C^-1/2) embeddings and P.
        std = self.config.hidden_size**-0.5
        if isinstance(module, nn.Linear):
            init.xavier_uniform_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        if isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None:
                init.zeros_(module.weight[module.padding_idx])
        if isinstance(module, LunaSeq2SeqEncoder):
            init.normal_(module.projected_embeddings, mean=0.0, std=std)


class LunaSeq2SeqEncoder(LunaSeq2SeqPreTrainedModel):
    """Tokens (scaled) plus positions, and P = scale * projected_embeddings[:l'] (plus a sinusoid over its slots with
    sinusoidal positions), dropout on both, then `encoder_layers` Luna layers (final LayerNorms if pre-LN)."""

    def __init__(self, config: LunaSeq2SeqConfig):
        super().__init__(config)
        self.embed_scale = math.sqrt(config.hidden_size) if config.scale_embedding else 1.0
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.embed_positions = LunaSeq2SeqPositions(config)
        self.projected_embeddings = nn.Parameter(torch.empty(config.projected_length, config.hidden_size))
        self.dropout = LunaDropout(config.hidden_dropout_prob)
        self.layers = nn.ModuleList([LunaLayer(config) for _ in range(config.encoder_layers)])
        if config.normalize_before:
            self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
            self.packed_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    validate_inputs = LunaModel.validate_inputs
    projected_slot_mask = LunaModel.projected_slot_mask

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> LunaSeq2SeqEncoderOutput:
        token_mask = self.validate_inputs(input_ids, attention_mask, inputs_embeds)
        # A host check (skipped while tracing: a data-dependent branch torch.export cannot follow).
        if not is_tracing(token_mask) and bool((token_mask.sum(dim=1) == 0).any()):
            raise ValueError(
                "A source row has no tokens (its attention_mask is all 0): Luna's packed sequence has nothing to "
                "attend to. Give every row at least one token (e.g. the end-of-sentence token)."
            )
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        position_ids = torch.cumsum(token_mask, dim=1) * token_mask + self.config.pad_token_id
        hidden_states = self.embed_scale * inputs_embeds + self.embed_positions(position_ids, inputs_embeds.dtype)
        hidden_states = self.dropout(hidden_states)

        slot_mask = self.projected_slot_mask(token_mask)
        packed_length = slot_mask.shape[1]
        packed_states = self.embed_scale * self.projected_embeddings[:packed_length]
        if self.embed_positions.embeddings is None:  # sinusoidal: P gets its own, over slots 0..l'-1
            slots = torch.arange(packed_length, device=packed_states.device)
            packed_states = packed_states + sinusoidal_embeddings(slots, self.config.hidden_size).to(packed_states)
        packed_states = self.dropout(packed_states.expand(token_mask.shape[0], -1, -1))

        key_mask = pack_attention_mask(self.config, packed_states, hidden_states, token_mask)
        unpack_mask = unpack_attention_mask(self.config, hidden_states, packed_states, slot_mask)
        refuse_attention_maps(kwargs, self.config)
        states = [(hidden_states, packed_states)]
        for layer in self.layers:
            hidden_states, packed_states = layer(hidden_states, packed_states, key_mask, unpack_mask, **kwargs)
            states.append((hidden_states, packed_states))
        if self.config.normalize_before:
            hidden_states = self.layer_norm(hidden_states)
            packed_states = self.packed_layer_norm(packed_states)
            states[-1] = (hidden_states, packed_states)
        wanted = requested("output_hidden_states", kwargs, self.config)
        all_states = tuple(zip(*states, strict=True)) if wanted else (None, None)
        return LunaSeq2SeqEncoderOutput(
            last_hidden_state=hidden_states,
            packed_hidden_state=packed_states,
            packed_attention_mask=slot_mask,
            hidden_states=all_states[0],
            packed_hidden_states=all_states[1],
        )


def pack_attention_mask(config, packed_states, context, context_mask):
    """The pack attention's mask: P (queries) over `context` (keys), the context's padding masked, in the form of the
    configured attention implementation."""
    return create_bidirectional_mask(
        config=config, inputs_embeds=packed_states, attention_mask=context_mask, encoder_hidden_states=context
    )


def unpack_attention_mask(config, queries, packed_states, slot_mask):
    """The unpack attention's mask: `queries` over P, the unused slots of P masked."""
    return create_bidirectional_mask(
        config=config, inputs_embeds=queries, attention_mask=slot_mask, encoder_hidden_states=packed_states
    )


class LunaCrossAttention(nn.Module):
    """The decoder's attention over the source (the authors' `LunarMultiheadAttention` with `static_context`): P packs
    the encoder output, Y_P = Attn(P, source), and the decoder tokens unpack it, Attn(X, Y_P). Y_P depends on the
    source only, so with a cache the unpack keys and values of Y_P are computed on the first step and reused."""

    def __init__(self, config: LunaSeq2SeqConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.pack_attention = LunaPackAttention(config)
        self.unpack_attention = LunaUnpackAttention(config)

    def forward(self, hidden_states, packed_states, encoder_hidden_states, pack_mask, unpack_mask, cache=None):
        """Returns the unpack output and Y_P (None when the keys and values come from the cache)."""
        if cache is not None and cache.has_previous_state(self.layer_idx):
            packed_context = None
            key_value = cache.read(self.layer_idx)
        else:
            packed_context, _ = self.pack_attention(packed_states, encoder_hidden_states, pack_mask)
            key_value = self.unpack_attention.key_value(packed_context)
            if cache is not None:
                cache.write(self.layer_idx, key_value, consumed_length=0)
        attended, _ = self.unpack_attention(hidden_states, None, unpack_mask, key_value=key_value)
        return attended, packed_context


class LunaSeq2SeqDecoderLayer(GradientCheckpointingLayer):
    """A Luna decoder layer (the authors' `LunaDecoderLayer`), post-LayerNorm or pre-LayerNorm:

        X  = LN1(X + drop(CausalAttn(X, P)))
        Xc, Y_P = CrossAttn(X, P, source)
        X  = LN2(X + drop(Xc));    P = LN2p(P + drop(Y_P))
        X  = LN3(X + drop(FFN(X)))

    Pre-LN normalises each sub-layer's input instead (P too before the cross-attention, but not before the causal
    attention, as the authors' code). With a filled cache P is None: the causal attention reads its pack queries and
    the cross-attention its keys and values from the cache."""

    def __init__(self, config: LunaSeq2SeqConfig, layer_idx: int):
        super().__init__()
        self.normalize_before = config.normalize_before
        self.self_attention = LunaCausalAttention(config, layer_idx)
        self.self_attention_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.cross_attention = LunaCrossAttention(config, layer_idx)
        self.cross_attention_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.cross_attention_packed_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        LunaLayer.add_feed_forward(self, config)

    feed_forward = LunaLayer.feed_forward

    def sublayer_input(self, states, layer_norm):
        return layer_norm(states) if self.normalize_before and states is not None else states

    def add_residual(self, states, update, layer_norm):
        states = states + self.dropout(update)
        return states if self.normalize_before else layer_norm(states)

    def forward(self, hidden_states, packed_states, encoder_hidden_states, masks, token_mask, token_count, cache=None):
        """`masks`: the cross-attention's pack and unpack masks and the slot mask of P (1 = usable slot)."""
        pack_mask, unpack_mask, slot_mask = masks
        self_cache, cross_cache = (
            (None, None) if cache is None else (cache.self_attention_cache, cache.cross_attention_cache)
        )
        attended, _ = self.self_attention(
            self.sublayer_input(hidden_states, self.self_attention_layer_norm),
            packed_states,
            token_mask,
            token_count,
            slot_mask,
            cache=self_cache,
        )
        hidden_states = self.add_residual(hidden_states, attended, self.self_attention_layer_norm)
        attended, packed_context = self.cross_attention(
            self.sublayer_input(hidden_states, self.cross_attention_layer_norm),
            self.sublayer_input(packed_states, self.cross_attention_packed_layer_norm),
            encoder_hidden_states,
            pack_mask,
            unpack_mask,
            cache=cross_cache,
        )
        hidden_states = self.add_residual(hidden_states, attended, self.cross_attention_layer_norm)
        if packed_context is not None:
            packed_states = self.add_residual(packed_states, packed_context, self.cross_attention_packed_layer_norm)
        update = self.feed_forward(self.sublayer_input(hidden_states, self.ffn_layer_norm))
        return self.add_residual(hidden_states, update, self.ffn_layer_norm), packed_states


class LunaSeq2SeqDecoder(LunaSeq2SeqPreTrainedModel):
    """Tokens (scaled) plus positions, dropout, `decoder_layers` decoder layers starting from the encoder's final P
    (a final LayerNorm if pre-LN)."""

    def __init__(self, config: LunaSeq2SeqConfig):
        super().__init__(config)
        self.embed_scale = math.sqrt(config.hidden_size) if config.scale_embedding else 1.0
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.embed_positions = LunaSeq2SeqPositions(config)
        self.dropout = LunaDropout(config.hidden_dropout_prob)
        self.layers = nn.ModuleList([LunaSeq2SeqDecoderLayer(config, index) for index in range(config.decoder_layers)])
        if config.normalize_before:
            self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None,
        encoder_outputs: LunaSeq2SeqEncoderOutput,
        encoder_attention_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        cache: EncoderDecoderCache | None = None,
        output_hidden_states: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """The decoder's final token states, and with `output_hidden_states` its states after the embeddings and
        after each layer. `attention_mask` (batch, cached + target length): 1 for real target tokens (right
        padding); `encoder_attention_mask` the source's."""
        tokens = input_ids if input_ids is not None else inputs_embeds[..., 0]
        if (input_ids is None) == (inputs_embeds is None) or tokens.dim() != 2 or 0 in tokens.shape:
            raise ValueError(
                "The decoder needs exactly one of decoder_input_ids or decoder_inputs_embeds, with at least one "
                "token per row: start the target with config.decoder_start_token_id (or pass labels)."
            )
        token_mask, token_count = self.count_tokens(tokens, attention_mask, cache)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        position_ids = token_count * token_mask + self.config.pad_token_id
        hidden_states = self.embed_scale * inputs_embeds + self.embed_positions(position_ids, inputs_embeds.dtype)
        hidden_states = self.dropout(hidden_states)

        packed_states, encoder_hidden_states, masks = self.source_inputs(
            hidden_states, encoder_outputs, encoder_attention_mask, cache
        )
        states = [hidden_states]
        for layer in self.layers:
            hidden_states, packed_states = layer(
                hidden_states, packed_states, encoder_hidden_states, masks, token_mask, token_count, cache=cache
            )
            states.append(hidden_states)
        if self.config.normalize_before:
            hidden_states = states[-1] = self.layer_norm(hidden_states)
        return hidden_states, tuple(states) if output_hidden_states else None

    def count_tokens(self, tokens, attention_mask, cache):
        """The target's token mask (1 = real token) and, per position, the real tokens up to it, cached ones
        included: the decoder's positions and the causal attention's 1/t."""
        token_mask = torch.ones_like(tokens, dtype=torch.long)
        if attention_mask is not None:
            token_mask = attention_mask[:, -tokens.shape[1] :].long()
        past_count = token_mask.new_zeros(tokens.shape[0])
        if cache is not None and cache.self_attention_cache.has_previous_state(0):
            past_count = cache.self_attention_cache.read(0)[TOKEN_COUNT]
            if past_count.shape[0] != tokens.shape[0]:
                raise ValueError(
                    f"The cache holds the states of {past_count.shape[0]} targets, the input has {tokens.shape[0]}: a "
                    "filled cache cannot be expanded (beam search or num_return_sequences > 1 from it). Start from "
                    "no cache, or fill it with the inputs repeated to the batch you will decode."
                )
        token_count = past_count[:, None] + token_mask.cumsum(dim=1)
        positions_read = tokens.shape[1] + (cache.get_seq_length() if cache is not None else 0)
        limit = self.config.max_position_embeddings  # checked on the host only when it might be exceeded (no sync)
        if positions_read > limit and int(token_count.max()) > limit:
            raise ValueError(
                f"The target reaches {int(token_count.max())} tokens, more than this model's "
                f"max_position_embeddings={self.config.max_position_embeddings}: shorten the target, or generate "
                f"with max_length <= {self.config.max_position_embeddings}."
            )
        return token_mask, token_count

    def source_inputs(self, hidden_states, encoder_outputs, encoder_attention_mask, cache):
        """P, the source, and the cross-attention's pack and unpack masks with P's slot mask. Once the cache holds
        every layer's P-dependent states, P and the source are None and no pack mask is built: a decoding step
        reads neither."""
        packed_states, slot_mask = encoder_outputs.packed_hidden_state, encoder_outputs.packed_attention_mask
        unpack_mask = unpack_attention_mask(self.config, hidden_states, packed_states, slot_mask)
        if cache is not None and cache.cross_attention_cache.has_previous_state(0):
            return None, None, (None, unpack_mask, slot_mask)
        encoder_hidden_states = encoder_outputs.last_hidden_state
        if encoder_attention_mask is None:
            encoder_attention_mask = torch.ones(encoder_hidden_states.shape[:2], device=hidden_states.device)
        pack_mask = pack_attention_mask(
            self.config, packed_states, encoder_hidden_states, encoder_attention_mask.long()
        )
        return packed_states, encoder_hidden_states, (pack_mask, unpack_mask, slot_mask)


def shift_tokens_right(labels: torch.Tensor, pad_token_id: int, decoder_start_token_id: int) -> torch.Tensor:
    """The decoder's inputs for `labels`: the start token, then the labels but the last (-100 read as padding)."""
    shifted = labels.new_full(labels.shape, decoder_start_token_id)
    shifted[:, 1:] = labels[:, :-1]
    return shifted.masked_fill(shifted == -100, pad_token_id)


class LunaSeq2SeqModel(LunaSeq2SeqPreTrainedModel):
    # With tie_word_embeddings the source and target share one matrix (fairseq's --share-all-embeddings).
    _tied_weights_keys = {"decoder.embed_tokens.weight": "encoder.embed_tokens.weight"}

    def __init__(self, config: LunaSeq2SeqConfig):
        super().__init__(config)
        self.encoder = LunaSeq2SeqEncoder(config)
        self.decoder = LunaSeq2SeqDecoder(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.encoder.embed_tokens

    def set_input_embeddings(self, value):
        self.encoder.embed_tokens = value
        if self.config.tie_word_embeddings:
            self.decoder.embed_tokens = value

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_outputs: LunaSeq2SeqEncoderOutput | None = None,
        cache: EncoderDecoderCache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        decoder_inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> Seq2SeqModelOutput:
        r"""
        input_ids, attention_mask: the source and its mask (1 = real token; left or right padding).
        decoder_input_ids (`torch.LongTensor` of shape `(batch_size, target_length)`): the target, starting with
            `config.decoder_start_token_id`; with a filled cache, only the new tokens.
        decoder_attention_mask: 1 for real target tokens (right padding), cached columns included or not.
        encoder_outputs (`LunaSeq2SeqEncoderOutput`, *optional*): the encoder's output, instead of the source.
        cache (`EncoderDecoderCache` of two `LunaCache`, *optional*; also accepted as `past_key_values`): per decoder
            layer, the causal attention's running sums, token count and pack queries, and the cross-attention's keys
            and values of the packed source; their size depends on neither the source nor the target length.
        """
        cache = take_cache_argument(cache, kwargs.pop("past_key_values", None))
        use_cache = use_cache if use_cache is not None else self.config.use_cache and not self.training
        refuse_attention_maps(kwargs, self.config)
        output_hidden_states = requested("output_hidden_states", kwargs, self.config)
        if encoder_outputs is None:
            encoder_outputs = self.encoder(input_ids, attention_mask, inputs_embeds, **kwargs)
        elif isinstance(encoder_outputs, (tuple, list)):  # return_dict=False outputs, or a BART-style caller's tuple
            if len(encoder_outputs) not in (3, 5):
                raise ValueError(
                    f"encoder_outputs is a tuple of {len(encoder_outputs)}: Luna's decoder needs the encoder's "
                    "(last_hidden_state, packed_hidden_state, packed_attention_mask), as model.get_encoder() returns "
                    "them; pass that output (or the source as input_ids)."
                )
            encoder_outputs = LunaSeq2SeqEncoderOutput(*encoder_outputs)
        if use_cache and cache is None:
            cache = self.empty_cache()
        check_cache(cache, self.config.decoder_layers)
        hidden_states, decoder_hidden_states = self.decoder(
            decoder_input_ids,
            encoder_outputs,
            encoder_attention_mask=attention_mask,
            attention_mask=decoder_attention_mask,
            inputs_embeds=decoder_inputs_embeds,
            cache=cache,
            output_hidden_states=output_hidden_states,
        )
        return Seq2SeqModelOutput(
            last_hidden_state=hidden_states,
            **{CACHE_OUTPUT_NAME: cache if use_cache else None},
            decoder_hidden_states=decoder_hidden_states,
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            encoder_hidden_states=encoder_outputs.hidden_states if output_hidden_states else None,
        )


def check_cache(cache, num_layers: int) -> None:
    if cache is None:
        return
    caches = (getattr(cache, "self_attention_cache", None), getattr(cache, "cross_attention_cache", None))
    if not all(isinstance(part, LunaCache) and len(part.layers) == num_layers for part in caches):
        raise ValueError(
            "Luna's decoder keeps constant-size states, not keys and values of every token: pass "
            "EncoderDecoderCache(LunaCache(config), LunaCache(config)), or no cache."
        )


class LunaForConditionalGeneration(LunaCacheForGeneration, LunaSeq2SeqPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.encoder.embed_tokens.weight"}

    def __init__(self, config: LunaSeq2SeqConfig):
        super().__init__(config)
        self.model = LunaSeq2SeqModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_encoder(self, modality: str | None = None):
        return self.model.encoder

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_outputs: LunaSeq2SeqEncoderOutput | None = None,
        cache: EncoderDecoderCache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        decoder_inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        past_key_values: EncoderDecoderCache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> Seq2SeqLMOutput:
        r"""As `LunaSeq2SeqModel.forward`; labels (`torch.LongTensor` of shape `(batch_size, target_length)`): the
        target (-100 where no prediction is scored); without `decoder_input_ids` the decoder reads them shifted right
        after `config.decoder_start_token_id`. past_key_values: `cache` under its name before transformers 5.25,
        whose generate() passes it so."""
        if labels is not None:
            use_cache = False
            if decoder_input_ids is None and decoder_inputs_embeds is None:
                decoder_input_ids = self.prepare_decoder_input_ids_from_labels(labels)
        cache = take_cache_argument(cache, past_key_values)
        outputs = self.model(
            input_ids,
            attention_mask=attention_mask,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            encoder_outputs=encoder_outputs,
            cache=cache,
            inputs_embeds=inputs_embeds,
            decoder_inputs_embeds=decoder_inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        logits = self.lm_head(outputs.last_hidden_state)
        loss = None
        if labels is not None:
            # Summed over the batch's target tokens and divided by the Trainer's count of them when it passes one,
            # so that gradient accumulation gives the update of one large batch (the encoder heads do the same).
            labels = labels.to(logits.device)
            loss = fixed_cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), kwargs.get("num_items_in_batch"))
        return Seq2SeqLMOutput(
            loss=loss,
            logits=logits,
            **{CACHE_OUTPUT_NAME: getattr(outputs, CACHE_OUTPUT_NAME)},
            decoder_hidden_states=outputs.decoder_hidden_states,
            encoder_last_hidden_state=outputs.encoder_last_hidden_state,
            encoder_hidden_states=outputs.encoder_hidden_states,
        )

    def generate(self, *args, **kwargs):
        # generate() expands a caller's encoder_outputs in place for beams and num_return_sequences (BART's too), so
        # that passing the same object again would fail: it works on a copy, and the caller's is left as it was.
        encoder_outputs = kwargs.get("encoder_outputs")
        if isinstance(encoder_outputs, ModelOutput):
            kwargs["encoder_outputs"] = type(encoder_outputs)(**encoder_outputs)
        return super().generate(*args, **kwargs)

    def prepare_decoder_input_ids_from_labels(self, labels: torch.Tensor):
        return shift_tokens_right(labels, self.config.pad_token_id, self.config.decoder_start_token_id)


__all__ = [
    "LunaForConditionalGeneration",
    "LunaSeq2SeqDecoder",
    "LunaSeq2SeqEncoder",
    "LunaSeq2SeqEncoderOutput",
    "LunaSeq2SeqModel",
    "LunaSeq2SeqPreTrainedModel",
]

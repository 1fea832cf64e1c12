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
"""Causal (decoder-only) Luna, paper §3.3: `LunaDecoderModel` and `LunaForCausalLM`, with a constant-size cache of
running sums for `generate()`. The attention kernels are in `modeling_luna_attention.py`; the feed-forward block and
the LM head are the encoder's (`modeling_luna.py`).

Copied next to saved checkpoints for `trust_remote_code`: it imports only torch, transformers and its siblings.
"""

import torch
from torch import nn
from transformers import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs
from transformers.utils.generic import can_return_tuple

from .configuration_luna import LunaConfig
from .modeling_luna import (
    LunaDropout,
    LunaForMaskedLM,
    LunaLayer,
    LunaLMHead,
    LunaModel,
    LunaPreTrainedModel,
)
from .modeling_luna_attention import CAUSAL_ATTENTION_CLASSES, TOKEN_COUNT, LunaCache, LunaCacheForGeneration
from .modeling_luna_vision import LunaPatchEmbeddings  # noqa: F401  (imported by modeling_luna: transformers_compat.py)
from .transformers_compat import (
    CACHE_OUTPUT_NAME,
    capture_outputs,
    init,
    require_generation_support,
    slice_logits_to_keep,
    take_cache_argument,
)


class LunaCausalEmbeddings(nn.Module):
    """Tokens plus learned positions (numbered over real tokens as in `LunaEmbeddings`), LayerNorm, dropout."""

    def __init__(self, config: LunaConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size, config.pad_token_id)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = LunaDropout(config.hidden_dropout_prob)

    def forward(self, input_ids, inputs_embeds, position_ids):
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        return self.dropout(self.layer_norm(inputs_embeds + self.position_embeddings(position_ids)))


class LunaCausalLayer(GradientCheckpointingLayer):
    """A decoder-only Luna layer, post-LayerNorm as `LunaLayer`: causal attention over the layer's own learned P, then
    the feed-forward. P is a parameter, so it holds no information about the tokens (paper §3.3, "sources of P").
    With `attention_type="learned_kernel"` the attention is `LearnedKernelCausalAttention` and there is no P."""

    def __init__(self, config: LunaConfig, layer_idx: int):
        super().__init__()
        self.projected_embeddings = None
        if config.attention_type == "nested":
            self.projected_embeddings = nn.Parameter(torch.empty(config.projected_length, config.hidden_size))
        self.attention = CAUSAL_ATTENTION_CLASSES[config.attention_type](config, layer_idx)
        self.attention_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        LunaLayer.add_feed_forward(self, config)

    feed_forward = LunaLayer.feed_forward  # the encoder layer's, with its gelu recomputation in training

    def forward(self, hidden_states, token_mask, token_count, cache=None) -> torch.Tensor:
        attended, _ = self.attention(hidden_states, self.projected_embeddings, token_mask, token_count, cache=cache)
        hidden_states = self.attention_layer_norm(hidden_states + self.dropout(attended))
        return self.ffn_layer_norm(hidden_states + self.dropout(self.feed_forward(hidden_states)))


class LunaDecoderPreTrainedModel(LunaPreTrainedModel):
    _no_split_modules = ["LunaCausalEmbeddings", "LunaCausalLayer"]
    _is_stateful = True  # running sums cannot be rolled back (the cache refuses generation methods that crop it)
    _can_record_outputs = {"hidden_states": LunaCausalLayer}

    def __init__(self, config: LunaConfig, *args, **kwargs):
        require_generation_support(type(self).__name__)
        super().__init__(config, *args, **kwargs)

    def empty_cache(self) -> LunaCache:
        return LunaCache(self.config)

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, LunaCausalLayer) and module.projected_embeddings is not None:
            # Unit scale, as the encoder's P after its LayerNorm.
            init.normal_(module.projected_embeddings, mean=0.0, std=1.0)


def check_cache_continues(cache: LunaCache, tokens: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
    """A filled cache continues only the rows it read, with the positions it read: its running sums cannot be
    expanded, reordered or rolled back. Without these checks the model would read the new tokens as following text
    they do not follow and return wrong outputs silently."""
    cached_rows, (rows, new_length) = cache.read(0)[TOKEN_COUNT].shape[0], tokens.shape
    if rows != cached_rows:
        raise ValueError(
            f"The cache holds running sums for {cached_rows} rows, the input has {rows}. A filled cache cannot be "
            "expanded: beam search and num_return_sequences > 1 must start from an empty cache (or none)."
        )
    read = cache.get_seq_length()
    if attention_mask is not None and attention_mask.shape[1] not in (new_length, read + new_length):
        raise ValueError(
            f"The attention mask covers {attention_mask.shape[1]} positions, but the cache has read {read} and "
            f"{new_length} tokens are new: pass a mask of {read + new_length} (cached + new) or {new_length} (new) "
            "columns. A cache that has read more than a prefix of this text (e.g. one used by an earlier generate() "
            "call, which also read the generated tokens) cannot be reused: start from LunaCache(config), or none."
        )


class LunaDecoderModel(LunaDecoderPreTrainedModel):
    def __init__(self, config: LunaConfig):
        super().__init__(config)
        self.embeddings = LunaCausalEmbeddings(config)
        self.layers = nn.ModuleList([LunaCausalLayer(config, index) for index in range(config.num_hidden_layers)])
        self.post_init()

    get_input_embeddings = LunaModel.get_input_embeddings  # both read `self.embeddings.word_embeddings`
    set_input_embeddings = LunaModel.set_input_embeddings

    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        cache: LunaCache | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPast:
        r"""
        attention_mask (`torch.Tensor` of shape `(batch_size, cached + sequence_length)`, *optional*): 1 for real
            tokens, 0 for padding (left padding for batched generation); its last `sequence_length` columns are used.
        cache (`LunaCache`, *optional*; also accepted as `past_key_values`): per layer the running sums, the token
            count and (nested attention) the pack queries; its size does not grow with the context.
        """
        cache = take_cache_argument(cache, kwargs.pop("past_key_values", None))
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds.")
        use_cache = use_cache if use_cache is not None else self.config.use_cache and not self.training
        if use_cache and cache is None:
            cache = self.empty_cache()
        if cache is not None and (not isinstance(cache, LunaCache) or len(cache.layers) != len(self.layers)):
            raise ValueError(
                f"Causal Luna keeps running sums, not keys and values: pass LunaCache(config) (from luna_hf, or this "
                f"model's modeling_luna_attention), or no cache; got {type(cache).__name__}."
            )

        tokens = input_ids if input_ids is not None else inputs_embeds[..., 0]
        token_mask = torch.ones_like(tokens, dtype=torch.long)
        if attention_mask is not None:
            token_mask = attention_mask[:, -tokens.shape[1] :].long()
        past_count = token_mask.new_zeros(tokens.shape[0])
        if cache is not None and cache.has_previous_state(0):
            past_count = cache.read(0)[TOKEN_COUNT]
            check_cache_continues(cache, tokens, attention_mask)
        token_count = past_count[:, None] + token_mask.cumsum(dim=1)
        position_ids = token_count * token_mask + self.config.pad_token_id
        # Real tokens never outnumber the positions read, so only then is the count read back from the device (a
        # host synchronisation that a decoding step on the GPU would otherwise pay for every token).
        limit = self.config.max_sequence_length
        positions_read = tokens.shape[1] + (cache.get_seq_length() if cache is not None else 0)
        if positions_read > limit and int(token_count.max()) > limit:
            raise ValueError(f"{int(token_count.max())} tokens exceed the model's {limit}.")

        hidden_states = self.embeddings(input_ids, inputs_embeds, position_ids)
        for layer in self.layers:
            hidden_states = layer(hidden_states, token_mask, token_count, cache=cache)
        cache = {CACHE_OUTPUT_NAME: cache if use_cache else None}
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, **cache)


class LunaForCausalLM(LunaCacheForGeneration, LunaDecoderPreTrainedModel, GenerationMixin):
    # The masked LM's head (`LunaLMHead`), tied to the token embeddings the same way.
    _tied_weights_keys = LunaForMaskedLM._tied_weights_keys
    get_output_embeddings = LunaForMaskedLM.get_output_embeddings
    set_output_embeddings = LunaForMaskedLM.set_output_embeddings

    def __init__(self, config: LunaConfig):
        if not config.is_decoder:
            raise ValueError("LunaForCausalLM is the causal Luna of paper §3.3: it needs LunaConfig(is_decoder=True).")
        super().__init__(config)
        self.luna = LunaDecoderModel(config)
        self.lm_head = LunaLMHead(config)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        cache: LunaCache | None = None,
        use_cache: bool | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: LunaCache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithPast:
        r"""labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*): the input ids (shifted
        inside: position t predicts token t + 1), -100 where no prediction is scored. past_key_values: `cache` under
        its name before transformers 5.25, whose generate() passes it so."""
        cache = take_cache_argument(cache, past_key_values)
        outputs = self.luna(input_ids, attention_mask, inputs_embeds, cache=cache, use_cache=use_cache, **kwargs)
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        hidden_states = outputs.hidden_states
        cache = {CACHE_OUTPUT_NAME: getattr(outputs, CACHE_OUTPUT_NAME)}
        return CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=hidden_states, **cache)

    def prepare_inputs_for_generation(self, input_ids, next_sequence_length=None, inputs_embeds=None, **kwargs):
        # generate() continues a filled cache by feeding the input's last (length - cached) tokens; a cache that has
        # read as much as the input, or more, would make that count zero or negative and the model read wrong tokens.
        if next_sequence_length is not None and next_sequence_length < 1:
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            raise ValueError(
                f"The cache has already read {int(cache.get_seq_length())} positions, as many as this input's "
                f"{input_ids.shape[1]} or more: it holds another text, or an earlier generate() call's (which also "
                "read the generated tokens). Pass a cache that holds a beginning of this input, a new "
                "LunaCache(model.config), or none."
            )
        return super().prepare_inputs_for_generation(
            input_ids, next_sequence_length, inputs_embeds=inputs_embeds, **kwargs
        )


__all__ = ["LunaDecoderModel", "LunaForCausalLM"]

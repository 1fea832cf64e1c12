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
"""Configuration of Luna's encoder-decoder translation model. Copied next to saved checkpoints for
`trust_remote_code`."""

from transformers.activations import ACT2FN

from .transformers_compat import PreTrainedConfig

POSITION_EMBEDDING_TYPES = ("sinusoidal", "learned")
CAUSAL_ACTIVATIONS = ("softplus", "elu")


class LunaSeq2SeqConfig(PreTrainedConfig):
    r"""
    Configuration of Luna's encoder-decoder model for translation (Ma et al., 2021, §4.2 and Table 4; the authors'
    fairseq `luna` architecture). The defaults build their `luna_base_tied` with projected length 32: Transformer-base
    (512 dimensions, 8 heads, 2048 feed-forward, 6 + 6 layers, ReLU, post-LayerNorm, sinusoidal positions, embeddings
    scaled by sqrt(hidden_size), one embedding matrix shared by source, target and output).

    A separate class from `LunaConfig` (the RoBERTa-style encoder and the decoder-only model): the translation model
    has other embeddings (sinusoidal positions, no embedding LayerNorm, P scaled and with positions), two stacks, and
    none of the encoder's pooling, token-type or learned-kernel fields. The fields the Luna layers read keep
    `LunaConfig`'s names, so both stacks are built from the same layer classes.

    Args:
        vocab_size (`int`, defaults to 32000): the joined source/target vocabulary.
        hidden_size (`int`, defaults to 512): the model dimension C.
        encoder_layers (`int`, defaults to 6) and decoder_layers (`int`, defaults to 6): the depths of the two stacks.
        num_attention_heads (`int`, defaults to 8): the heads of every attention (pack, unpack and causal); the
            authors' `--encoder/decoder-projected-attention-heads` default to this and are not separate here.
        intermediate_size (`int`, defaults to 2048): the feed-forward width.
        hidden_act (`str`, defaults to `"relu"`): the feed-forward activation.
        projected_length (`int`, defaults to 32): l, the slots of the packed sequence P (the paper's 16 or 32).
        dynamic_projection (`bool`, defaults to `True`): cut P to min(l, longest source) and mask the slots j >= a
            row's source length (the authors' default; `False` is `--fix-projection-length`).
        tie_key_value (`bool`, defaults to `True`): K = V in every attention (`luna_base_tied`; `False` is
            `luna_base_untied`).
        normalize_before (`bool`, defaults to `False`): pre-LayerNorm layers and final LayerNorms on both stacks
            (the authors' `--encoder-normalize-before --decoder-normalize-before`).
        position_embedding_type (`str`, defaults to `"sinusoidal"`): fairseq's sinusoidal token positions (and a
            sinusoid added to P), or `"learned"` positions (`--encoder/decoder-learned-pos`; then P has none).
        scale_embedding (`bool`, defaults to `True`): multiply token embeddings and P by sqrt(hidden_size) (`False` is
            `--no-scale-embedding`).
        max_position_embeddings (`int`, defaults to 1024): the longest source and the longest target, in tokens.
        tie_word_embeddings (`bool`, defaults to `True`): the output projection is the shared embedding matrix
            (`--share-all-embeddings`).
        hidden_dropout_prob, attention_probs_dropout_prob, activation_dropout (`float`, defaults to 0.1, 0.0, 0.0):
            the residual/embedding dropout, the attention-weight dropout and the dropout after the activation.
        causal_activation (`str`, defaults to `"softplus"`) and causal_chunk_size (`int`, defaults to 64): the
            decoder's causal attention, as in `LunaConfig`.
        decoder_start_token_id (`int`, defaults to 2): fairseq starts the target with `</s>`.

    Example:

    ```python
    >>> from luna_hf import LunaForConditionalGeneration, LunaSeq2SeqConfig
    >>> model = LunaForConditionalGeneration(LunaSeq2SeqConfig(vocab_size=1000, encoder_layers=2, decoder_layers=2))
    ```"""

    model_type = "luna_seq2seq"
    attention_type = "nested"  # read by the shared Luna layers; the translation model has no other
    keys_to_ignore_at_inference = ["cache"]
    attribute_map = {"num_hidden_layers": "decoder_layers"}  # transformers sizes the generation cache by it

    def __init__(
        self,
        vocab_size=32000,
        hidden_size=512,
        encoder_layers=6,
        decoder_layers=6,
        num_attention_heads=8,
        intermediate_size=2048,
        hidden_act="relu",
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.0,
        activation_dropout=0.0,
        max_position_embeddings=1024,
        initializer_range=0.02,
        layer_norm_eps=1e-5,
        projected_length=32,
        dynamic_projection=True,
        tie_key_value=True,
        normalize_before=False,
        position_embedding_type="sinusoidal",
        scale_embedding=True,
        causal_activation="softplus",
        causal_chunk_size=64,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
        is_encoder_decoder=True,
        use_cache=True,
        tie_word_embeddings=True,
        **kwargs,
    ):
        super().__init__(**kwargs)  # first: transformers 4.x's base class sets defaults of its own for some fields
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.encoder_layers = encoder_layers
        self.decoder_layers = decoder_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.activation_dropout = activation_dropout
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.layer_norm_eps = layer_norm_eps
        self.projected_length = projected_length
        self.dynamic_projection = dynamic_projection
        self.tie_key_value = tie_key_value
        self.normalize_before = normalize_before
        self.position_embedding_type = position_embedding_type
        self.scale_embedding = scale_embedding
        self.causal_activation = causal_activation
        self.causal_chunk_size = causal_chunk_size
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.decoder_start_token_id = decoder_start_token_id
        self.is_encoder_decoder = is_encoder_decoder
        self.use_cache = use_cache
        self.tie_word_embeddings = tie_word_embeddings
        self.validate_luna_fields()

    def validate_luna_fields(self):
        """Raise a `ValueError` naming the first invalid field and the values it accepts."""
        for name in (
            "vocab_size",
            "hidden_size",
            "encoder_layers",
            "decoder_layers",
            "num_attention_heads",
            "intermediate_size",
            "projected_length",
            "causal_chunk_size",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"LunaSeq2SeqConfig.{name} must be a positive integer, got {value!r}.")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"LunaSeq2SeqConfig.hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads}); choose num_attention_heads among the divisors of hidden_size."
            )
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "activation_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"LunaSeq2SeqConfig.{name} must be in [0, 1), got {getattr(self, name)!r}.")
        for name in ("dynamic_projection", "tie_key_value", "normalize_before", "scale_embedding"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"LunaSeq2SeqConfig.{name} must be True or False, got {getattr(self, name)!r}.")
        if self.position_embedding_type not in POSITION_EMBEDDING_TYPES:
            raise ValueError(
                f"LunaSeq2SeqConfig.position_embedding_type must be one of {POSITION_EMBEDDING_TYPES}, got "
                f"{self.position_embedding_type!r}."
            )
        if self.causal_activation not in CAUSAL_ACTIVATIONS:
            raise ValueError(
                f"LunaSeq2SeqConfig.causal_activation must be one of {CAUSAL_ACTIVATIONS}, got "
                f"{self.causal_activation!r}."
            )
        if self.hidden_act not in ACT2FN:
            raise ValueError(f"LunaSeq2SeqConfig.hidden_act must be one of {sorted(ACT2FN)}, got {self.hidden_act!r}.")
        for name in ("pad_token_id", "decoder_start_token_id"):
            value = getattr(self, name)
            if value is None or not 0 <= value < self.vocab_size:
                raise ValueError(
                    f"LunaSeq2SeqConfig.{name} must be a token id in [0, vocab_size={self.vocab_size}), got {value!r}."
                )

    @property
    def max_sequence_length(self) -> int:
        """The longest source (and target) this model accepts."""
        return self.max_position_embeddings


__all__ = ["LunaSeq2SeqConfig"]

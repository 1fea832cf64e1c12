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
"""Luna configuration. This file is copied verbatim next to saved checkpoints for `trust_remote_code`."""

from transformers.activations import ACT2FN

from .transformers_compat import PreTrainedConfig

CLASSIFIER_POOLINGS = ("cls", "mean", "packed_mean", "packed_max", "packed_attention")
PACKED_POOLINGS = ("packed_mean", "packed_max", "packed_attention")  # read the packed sequence P
CAUSAL_ACTIVATIONS = ("softplus", "elu")
ATTENTION_TYPES = ("nested", "learned_kernel")
KERNEL_ENVELOPES = ("none", "exp_sqnorm")
KERNEL_FEATURE_MAPS = ("learned", "elu_plus_one")
POSITION_NUMBERINGS = ("padding_offset", "from_zero")


class LunaConfig(PreTrainedConfig):
    r"""
    Configuration of a Luna encoder (Ma et al., 2021, "Luna: Linear Unified Nested Attention"). The defaults build
    the authors' `luna_base_tied_512` model: RoBERTa-base with every self-attention replaced by Luna's nested
    pack/unpack attention over a learned sequence P of `projected_length` slots.

    Fields beyond RoBERTa's:
        projected_length (`int`, defaults to 128): l, the length of the extra sequence P (paper: 16, 128 or 256).
        tie_key_value (`bool`, defaults to `True`): one projection serves as both key and value, separately in the
            pack and in the unpack attention (the authors' "tied" models; their `--untie-luna-kv` is `False` here).
        dynamic_projection (`bool`, defaults to `True`): cut P to min(l, longest real length in the batch) and mask
            slot j of a row whose real length is <= j (the authors' default; `False` is their
            `--fix-projection-length`: every row uses all l slots).
        activation_dropout (`float`, defaults to 0.0): dropout after the feed-forward activation.
        classifier_pooling (`str`, defaults to `"cls"`): sentence representation used by `pooler_output` and the
            sequence-level heads: `"cls"` (the first real token), `"mean"` (the mean of the real tokens' final
            states), `"packed_mean"` (mean of the final packed sequence P over the row's valid slots, the paper's
            Table 3 "P" pooling), or the authors' two learned P poolings (parameters in the sequence heads'
            `classifier.pooler`): `"packed_max"` (a linear map of P, then the maximum over the valid slots; their
            `pooling_classification_head`) and `"packed_attention"` (the first real token attends over the valid
            slots of P, then LayerNorm; their `attention_classification_head`).
        classifier_dropout (`float`, *optional*): dropout of the classification heads; `None` uses
            `hidden_dropout_prob`.
        sparse_prediction (`bool`, defaults to `False`): with `labels`, `LunaForMaskedLM` runs its head only on the
            positions whose label is not `sparse_pred_ignore_index` (the authors' `masked_tokens`; ModernBERT's
            option): the same loss, and logits of shape (labelled tokens, vocab_size). Without labels the logits
            are always (batch_size, sequence_length, vocab_size). `scripts/pretrain_mlm.py` turns it on.
        sparse_pred_ignore_index (`int`, defaults to -100): the label of positions the sparse head skips.
        normalize_before (`bool`, defaults to `False`): pre-LayerNorm layers (the authors' `normalize_before`):
            each layer normalises X and P before the pack/unpack attention and X before the feed-forward block, the
            residuals add the un-normalised states, and `LunaModel` normalises X and P once more after the last
            layer (its `layer_norm` and `packed_layer_norm`, the authors' final `layer_norm` and
            `proj_layer_norm`). `False` is the paper's post-LayerNorm Eq. 6, used by every released checkpoint.
            Unlike the authors' code (which then drops them), the embeddings keep their LayerNorms. Pre-LN trains
            at learning rates where the post-LN small Luna collapses (docs/pretraining.md).

    Embeddings of a converted BERT (`scripts/convert_to_luna.py`, docs/conversion.md); the defaults are RoBERTa's and
    fairseq's, which every Luna checkpoint uses:
        type_vocab_size (`int`, defaults to 0): the number of token types (BERT's segment A / B, 2 in BERT; 1 in
            RoBERTa, whose single row is added to every token). 0 means no token-type embeddings, and the models then
            refuse `token_type_ids`. With n > 0, `token_type_ids` (default all 0) add `token_type_embeddings`.
        position_numbering (`str`, defaults to `"padding_offset"`): how real tokens are numbered into
            `position_embeddings`. `"padding_offset"` is RoBERTa's and fairseq's: pad_token_id + 1, pad_token_id + 2,
            ..., padded positions take the (zero) row pad_token_id, and `max_position_embeddings` = longest input +
            pad_token_id + 1 (514 for 512 tokens). `"from_zero"` is BERT's: 0, 1, ..., n - 1, no padding row, and
            `max_position_embeddings` is the longest input (512). Both count real tokens from the attention mask,
            so a left-padded row is numbered as the same row unpadded (BERT itself numbers positions, padding
            included, from the first position; the two agree for right padding).

    Attention (docs/learned-kernel.md):
        attention_type (`str`, defaults to `"nested"`): `"nested"` is Luna's pack/unpack attention over P (Ma et al.,
            2021), everything above. `"learned_kernel"` is the unrelated "LUNA: Linear Universal Neural Attention"
            (Shahbazi et al., 2025): each layer is a standard Transformer layer whose softmax is replaced by a
            linear attention phi(Q)(phi(K)^T V) / phi(Q)(phi(K)^T 1) with a learned feature map phi. There is no P:
            `projected_length`, `tie_key_value` and `dynamic_projection` are unused, the P poolings and the packed
            outputs are refused, and the layers' attention has separate query, key, value and output projections.
        kernel_num_projections (`int`, defaults to 16): m, the learned projections u_i(x) = w_i^T x + b_i of a
            head's query or key.
        kernel_num_channels (`int`, defaults to 4): L, the scalar functions psi_l applied to every projection; phi has
            D = m * L features.
        kernel_mlp_hidden (`int`, defaults to 64): the width of the one-hidden-layer scalar MLPs psi (ReLU).
        kernel_shared_channels (`bool`, defaults to `True`): one 1 -> hidden -> L MLP for the L channels; `False`
            gives L separate 1 -> hidden -> 1 MLPs (the authors' listing default).
        kernel_nonnegative (`bool`, defaults to `True`): a ReLU on psi's output, so that phi >= 0, every attention
            weight is >= 0 and the denominator is a sum of non-negative terms. `False` is an explicit opt-in to signed
            features: the denominator phi(q)^T sum_j phi(k_j) can then cross zero (it is clamped at `kernel_eps`),
            and the weights of a row need not be a distribution.
        kernel_envelope (`str`, defaults to `"none"`): the token-wise scale h of phi(x) = h(x)/sqrt(m) [psi(u(x))]:
            `"none"` (h = 1, the authors' listing) or `"exp_sqnorm"` (h(x) = exp(gamma ||x||^2), gamma learned,
            initialised to 0: an inferred form, the paper does not give h). It cancels on queries, so it is applied
            to keys only.
        kernel_eps (`float`, defaults to 1e-6): the denominator's floor, in float32.
        kernel_feature_map (`str`, defaults to `"learned"`): phi itself: `"learned"` (everything above) or
            `"elu_plus_one"`, the fixed map elu(x) + 1 per head dimension (Katharopoulos et al., 2020; no
            parameters, the `kernel_*` fields above unused): the fixed linearization the learned one is compared with.

    Fields of the causal (decoder-only) Luna of paper §3.3, `LunaForCausalLM`:
        is_decoder (`bool`, defaults to `False`): build the causal model: every layer attends over its own learned P
            (a parameter, so P holds no information about the tokens) and position t sees tokens 1..t only.
        causal_activation (`str`, defaults to `"softplus"`): ω of the causal pack attention, never softmax:
            `"softplus"` is the authors' softplus with β = ln 2, i.e. log2(1 + 2^z); `"elu"` is elu(z) + 1 (their
            code before 2021-08).
        causal_chunk_size (`int`, defaults to 64): c, the chunk length of the parallel causal form (a masked c x c
            product within a chunk, running sums across chunks), for both attention types.
        use_cache (`bool`, defaults to `True`): return the running sums (a constant-size cache) for `generate()`.

    Images (`LunaForImageClassification`; a converted ViT, docs/vision.md). With `image_size` set the model reads
    `pixel_values` instead of token ids: ViT's patch embeddings, [CLS] token and learned positions, then the Luna
    layers (pre-LayerNorm, as ViT, with `normalize_before=True`):
        image_size (`int`, defaults to `None`): the side of the square images the positions were learned for; `None`
            for a text model.
        patch_size (`int`, defaults to 16): the side of a patch; the image is cut into (image_size / patch_size)^2.
        num_channels (`int`, defaults to 3): the image's channels.

    Example:

    ```python
    >>> from luna_hf import LunaConfig, LunaModel
    >>> model = LunaModel(LunaConfig(projected_length=16))
    ```"""

    model_type = "luna"

    def __init__(
        self,
        vocab_size=50265,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        hidden_act="gelu",
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        activation_dropout=0.0,
        max_position_embeddings=514,
        initializer_range=0.02,
        layer_norm_eps=1e-5,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        projected_length=128,
        tie_key_value=True,
        dynamic_projection=True,
        classifier_pooling="cls",
        classifier_dropout=None,
        sparse_prediction=False,
        sparse_pred_ignore_index=-100,
        normalize_before=False,
        is_decoder=False,
        causal_activation="softplus",
        causal_chunk_size=64,
        use_cache=True,
        tie_word_embeddings=True,
        attention_type="nested",
        kernel_num_projections=16,
        kernel_num_channels=4,
        kernel_mlp_hidden=64,
        kernel_shared_channels=True,
        kernel_nonnegative=True,
        kernel_envelope="none",
        kernel_eps=1e-6,
        kernel_feature_map="learned",
        type_vocab_size=0,
        position_numbering="padding_offset",
        image_size=None,
        patch_size=16,
        num_channels=3,
        **kwargs,
    ):
        super().__init__(**kwargs)  # first: transformers 4.x's base class sets defaults of its own for some fields
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.activation_dropout = activation_dropout
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.layer_norm_eps = layer_norm_eps
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.projected_length = projected_length
        self.tie_key_value = tie_key_value
        self.dynamic_projection = dynamic_projection
        self.classifier_pooling = classifier_pooling
        self.classifier_dropout = classifier_dropout
        self.sparse_prediction = sparse_prediction
        self.sparse_pred_ignore_index = sparse_pred_ignore_index
        self.normalize_before = normalize_before
        self.is_decoder = is_decoder
        self.causal_activation = causal_activation
        self.causal_chunk_size = causal_chunk_size
        self.use_cache = use_cache
        self.tie_word_embeddings = tie_word_embeddings
        self.attention_type = attention_type
        self.kernel_num_projections = kernel_num_projections
        self.kernel_num_channels = kernel_num_channels
        self.kernel_mlp_hidden = kernel_mlp_hidden
        self.kernel_shared_channels = kernel_shared_channels
        self.kernel_nonnegative = kernel_nonnegative
        self.kernel_envelope = kernel_envelope
        self.kernel_eps = kernel_eps
        self.kernel_feature_map = kernel_feature_map
        self.type_vocab_size = type_vocab_size
        self.position_numbering = position_numbering
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.validate_luna_fields()
        self.validate_image_fields()

    def validate_luna_fields(self):
        """Raise a `ValueError` naming the first invalid field and the values it accepts."""
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "projected_length",
            "causal_chunk_size",
            "kernel_num_projections",
            "kernel_num_channels",
            "kernel_mlp_hidden",
        ):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"LunaConfig.{name} must be a positive integer, got {getattr(self, name)!r}.")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"LunaConfig.hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads}); choose num_attention_heads among the divisors of hidden_size."
            )
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "activation_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"LunaConfig.{name} must be in [0, 1), got {getattr(self, name)!r}.")
        if not isinstance(self.normalize_before, bool):
            raise ValueError(f"LunaConfig.normalize_before must be True or False, got {self.normalize_before!r}.")
        if self.normalize_before and self.is_decoder:
            raise ValueError("LunaConfig.normalize_before=True is implemented for the encoder only, not is_decoder.")
        if self.classifier_pooling not in CLASSIFIER_POOLINGS:
            raise ValueError(
                f"LunaConfig.classifier_pooling must be one of {CLASSIFIER_POOLINGS}, got {self.classifier_pooling!r}."
            )
        if self.causal_activation not in CAUSAL_ACTIVATIONS:
            raise ValueError(
                f"LunaConfig.causal_activation must be one of {CAUSAL_ACTIVATIONS}, got {self.causal_activation!r}."
            )
        self.validate_attention_type()
        if self.hidden_act not in ACT2FN:
            raise ValueError(f"LunaConfig.hidden_act must be one of {sorted(ACT2FN)}, got {self.hidden_act!r}.")
        if self.pad_token_id is None or not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(
                f"LunaConfig.pad_token_id must be a token id in [0, vocab_size={self.vocab_size}), got "
                f"{self.pad_token_id!r}: positions are numbered after it, as in RoBERTa."
            )
        if not isinstance(self.type_vocab_size, int) or self.type_vocab_size < 0:
            raise ValueError(
                f"LunaConfig.type_vocab_size must be a non-negative integer (0: no token types), got "
                f"{self.type_vocab_size!r}."
            )
        if self.position_numbering not in POSITION_NUMBERINGS:
            raise ValueError(
                f"LunaConfig.position_numbering must be one of {POSITION_NUMBERINGS}, got {self.position_numbering!r}: "
                '"padding_offset" numbers positions after pad_token_id (RoBERTa, fairseq), "from_zero" from 0 (BERT).'
            )
        if self.is_decoder and (self.type_vocab_size != 0 or self.position_numbering != "padding_offset"):
            raise ValueError(
                "LunaConfig.type_vocab_size and position_numbering are implemented for the encoder only, not "
                'is_decoder: leave them at 0 and "padding_offset".'
            )
        if self.position_numbering == "from_zero":
            if not isinstance(self.max_position_embeddings, int) or self.max_position_embeddings <= 0:
                raise ValueError(
                    f"LunaConfig.max_position_embeddings must be a positive integer, got "
                    f"{self.max_position_embeddings!r}."
                )
        elif self.max_position_embeddings <= self.pad_token_id + 1:
            raise ValueError(
                f"LunaConfig.max_position_embeddings ({self.max_position_embeddings}) must exceed pad_token_id + 1 "
                f"({self.pad_token_id + 1}): positions start after the padding index, so a model for n tokens needs "
                f"n + pad_token_id + 1 positions (514 for 512 tokens)."
            )

    def validate_attention_type(self):
        """The attention switch, the learned-kernel feature map's fields, and no P pooling without P."""
        if self.attention_type not in ATTENTION_TYPES:
            raise ValueError(
                f"LunaConfig.attention_type must be one of {ATTENTION_TYPES}, got {self.attention_type!r}: "
                '"nested" is Luna (Ma et al., 2021), "learned_kernel" the learned-kernel linear attention.'
            )
        for name in ("kernel_shared_channels", "kernel_nonnegative"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"LunaConfig.{name} must be True or False, got {getattr(self, name)!r}.")
        if self.kernel_envelope not in KERNEL_ENVELOPES:
            raise ValueError(
                f"LunaConfig.kernel_envelope must be one of {KERNEL_ENVELOPES}, got {self.kernel_envelope!r}."
            )
        if isinstance(self.kernel_eps, bool) or not isinstance(self.kernel_eps, (int, float)) or not (
            0.0 < self.kernel_eps < 1.0
        ):
            raise ValueError(f"LunaConfig.kernel_eps must be in (0, 1), got {self.kernel_eps!r}.")
        if self.kernel_feature_map not in KERNEL_FEATURE_MAPS:
            raise ValueError(
                f"LunaConfig.kernel_feature_map must be one of {KERNEL_FEATURE_MAPS}, got {self.kernel_feature_map!r}."
            )
        if self.kernel_feature_map != "learned" and self.attention_type != "learned_kernel":
            raise ValueError(f"LunaConfig.kernel_feature_map={self.kernel_feature_map!r} is a feature map of the "
                             'learned-kernel attention: set attention_type="learned_kernel", or leave it "learned".')
        if self.attention_type == "learned_kernel" and self.classifier_pooling in PACKED_POOLINGS:
            raise ValueError(
                f"LunaConfig.classifier_pooling={self.classifier_pooling!r} reads Luna's packed sequence P, which "
                'attention_type="learned_kernel" does not have: use classifier_pooling="cls" (the first real '
                'token) or "mean" (the mean of the real tokens), or attention_type="nested".'
            )

    def validate_image_fields(self):
        if self.image_size is None:
            return
        for name in ("image_size", "patch_size", "num_channels"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int) or (
                getattr(self, name) <= 0
            ):
                raise ValueError(f"LunaConfig.{name} must be a positive integer, got {getattr(self, name)!r}.")
        if self.image_size % self.patch_size:
            raise ValueError(f"LunaConfig.image_size ({self.image_size}) must be a multiple of patch_size "
                             f"({self.patch_size}): the image is cut into whole patches.")  # fmt: skip
        if self.is_decoder:
            raise ValueError("LunaConfig.image_size is for the encoder (images), not is_decoder.")

    @property
    def num_patches(self) -> int:
        """Patches of an `image_size` image; with the [CLS] token, the length of the position table."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def max_sequence_length(self) -> int:
        """The longest input this model accepts: RoBERTa-style positions start after the padding index, BERT-style
        ones (`position_numbering="from_zero"`) at 0."""
        if self.position_numbering == "from_zero":
            return self.max_position_embeddings
        return self.max_position_embeddings - self.pad_token_id - 1


__all__ = ["LunaConfig"]

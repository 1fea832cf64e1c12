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
"""Luna's attention kernels, for the encoder (`modeling_luna.py`) and the causal decoder (`modeling_luna_causal.py`).

Nested attention (Ma et al., 2021): `LunaAttention`, the softmax attention that a Luna layer runs twice (pack, then
unpack), and `LunaCausalAttention`, the causal form of paper §3.3 with its running sums (`causal_product`).

Learned-kernel attention (Shahbazi et al., 2025, `attention_type="learned_kernel"`): `LearnedKernelFeatureMap`, the
learned feature map phi, `LearnedKernelAttention`, the bidirectional linear attention phi(Q)(phi(K)^T V) /
phi(Q)(phi(K)^T 1), and `LearnedKernelCausalAttention`, its causal form (the same `causal_product` and cache as the
nested causal attention).

`LunaCache`: the causal attentions' constant-size states for `generate()`.

Copied next to saved checkpoints for `trust_remote_code`: it imports only torch, transformers and its siblings
`configuration_luna.py` and `transformers_compat.py`.
"""

import math
from collections.abc import Callable

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs

from .configuration_luna import LunaConfig
from .transformers_compat import CACHE_OUTPUT_NAME, attention_function


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Unpack[TransformersKwargs],
):
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


class LunaAttention(nn.Module):
    """Multi-head attention of `queries` over `context`; Luna uses it twice per layer (pack, then unpack).

    With `config.tie_key_value` one projection gives both keys and values (the authors' "tied" Luna). Only the
    unpack attention has an output projection: the packed context is returned raw, as in the authors' code.
    """

    def __init__(self, config: LunaConfig, output_projection: bool):
        super().__init__()
        self.config = config
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False  # Without it SDPA turns causal whenever the mask is None.
        self.tie_key_value = config.tie_key_value
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        if self.tie_key_value:
            self.kv_proj = nn.Linear(config.hidden_size, config.hidden_size)
        else:
            self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
            self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size) if output_projection else nn.Identity()
        self.dropout_p = config.attention_probs_dropout_prob

    def split_heads(self, states: torch.Tensor) -> torch.Tensor:
        return states.view(*states.shape[:2], -1, self.head_dim).transpose(1, 2)

    def key_value(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values of `context`, split into heads (one tensor twice when tied)."""
        if self.tie_key_value:
            key = value = self.split_heads(self.kv_proj(context))
            return key, value
        return self.split_heads(self.k_proj(context)), self.split_heads(self.v_proj(context))

    def forward(
        self,
        queries: torch.Tensor,
        context: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        key_value: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`key_value`: `self.key_value(context)` computed before (the seq2seq decoder's cache), instead of
        `context`."""
        query = self.split_heads(self.q_proj(queries))
        key, value = self.key_value(context) if key_value is None else key_value

        attention_interface: Callable = attention_function(self.config._attn_implementation, eager_attention_forward)
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.dropout_p if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*queries.shape[:2], -1).contiguous()
        return self.o_proj(attn_output), attn_weights


class LunaPackAttention(LunaAttention):
    """P attends to X. No output projection: the packed context is returned raw, as in the authors' code."""

    def __init__(self, config: LunaConfig):
        super().__init__(config, output_projection=False)


class LunaUnpackAttention(LunaAttention):
    """X attends to the packed context (two classes, so that the output recorders tell the two maps apart by class:
    transformers 5.9 matched their names as substrings, and "pack_attention" is one of "unpack_attention")."""

    def __init__(self, config: LunaConfig):
        super().__init__(config, output_projection=True)


KEY_SUMS, VALUE_SUMS, TOKEN_COUNT, PACK_QUERIES = range(4)  # a causal attention's states in its `LunaCacheLayer`
CAUSAL_ACTIVATIONS = {  # the authors' softplus has beta = ln 2: log2(1 + 2^z), which is 1 at z = 0
    "softplus": lambda scores: nn.functional.softplus(scores, beta=math.log(2.0)),
    "elu": lambda scores: nn.functional.elu(scores) + 1.0,
}


def causal_product(x, y, z, token_count, initial_state, chunk_size: int):
    """Paper Eq. 7 after a state S_0: out_t = (1/t) x_t (S_0 + sum_{j<=t} y_j^T z_j), x and y (..., n, d1), z (..., n,
    d2), t (..., n, 1) or None (no division), S_0 (..., d1, d2) or None. A masked c x c product within each chunk, the
    running d1 x d2 sums across chunks (one d1 x d2 state per chunk, n/c of them); never n x n nor n x d1 x d2. Sums in
    (at least) float32. Returns the outputs and the final state. Both causal attentions use it."""
    dtype = x.dtype
    x, y, z = (t.to(torch.promote_types(dtype, torch.float32)) for t in (x, y, z))
    length = x.shape[-2]
    if length == 1 and initial_state is not None:  # a decoding step: one rank-1 update of the state
        state = initial_state + y.transpose(-1, -2) @ z
        output = x @ state
        return (output if token_count is None else output / token_count.to(x.dtype)).to(dtype), state
    chunk = min(chunk_size, length)
    x, y, z = (nn.functional.pad(t, (0, 0, 0, -length % chunk)).unflatten(-2, (-1, chunk)) for t in (x, y, z))
    chunk_sums = y.transpose(-1, -2) @ z  # (..., chunks, d1, d2)
    if initial_state is None:
        initial_state = chunk_sums.new_zeros(chunk_sums.shape[:-3] + chunk_sums.shape[-2:])
    states_after = initial_state.unsqueeze(-3) + chunk_sums.cumsum(dim=-3)
    states_before = torch.cat([initial_state.unsqueeze(-3), states_after[..., :-1, :, :]], dim=-3)
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=x.device).tril()
    within_chunk = (x @ y.transpose(-1, -2)).masked_fill(~causal, 0.0) @ z
    output = (within_chunk + x @ states_before).flatten(-3, -2)[..., :length, :]
    if token_count is not None:
        output = output / token_count.to(output.dtype)
    return output.to(dtype), states_after[..., -1, :, :]


CANNOT_ROLL_BACK = (
    "Luna's cache holds running sums, which cannot be rolled back to an earlier token: generation methods that crop "
    "the cache (assisted generation, prompt lookup decoding) are not supported. Generate without assistant_model / "
    "prompt_lookup_num_tokens."
)


class LunaCacheLayer(CacheLayerMixin):
    """One decoder layer's constant-size states (a causal attention's running sums, token count and pack queries, or
    a cross-attention's keys and values) and the number of positions they have read. transformers' own
    linear-attention cache layers changed their interface from release to release, so Luna keeps its own; it is a
    `CacheLayerMixin` only so that transformers' `Cache` methods accept it, and holds no per-token keys and values."""

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self):
        super().__init__()
        self.states: list[torch.Tensor] | None = None
        self.consumed_length = 0

    def lazy_initialization(self, *args, **kwargs) -> None:
        pass  # the states are written whole by `LunaCache.write`

    def update(self, *args, **kwargs):
        raise ValueError("Luna's cache keeps running sums, not keys and values: it has no update(); use write().")

    def get_seq_length(self) -> int:
        return self.consumed_length

    def get_mask_sizes(self, *args, **kwargs) -> tuple[int, int]:
        raise ValueError("Luna's cache keeps running sums, not keys and values: no attention mask is built over it.")

    def get_max_length(self) -> int:
        return -1  # no sequence dimension: the states do not grow with the context

    get_max_cache_shape = get_max_length  # the same, under transformers' name before 5.13

    def reset(self) -> None:
        self.states, self.consumed_length = None, 0

    def offload(self) -> None:
        pass  # a few small tensors: never offloaded

    def prefetch(self) -> None:
        pass

    def map_states(self, function) -> None:
        if self.states is not None:
            self.states = [function(state) for state in self.states]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.map_states(lambda state: state.index_select(0, beam_idx.to(state.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.map_states(lambda state: state.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.map_states(lambda state: state[indices, ...])

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError(CANNOT_ROLL_BACK)


class LunaCache(Cache):
    """The cache of Luna's causal attentions for `generate()` and step-by-step decoding: per layer a few tensors whose
    size does not grow with the context (`LunaCacheLayer`). `LunaCache(config)` for `LunaForCausalLM`; the
    translation model keeps two, the decoder's own and its cross-attention's (`EncoderDecoderCache`). The models
    build it themselves when `use_cache` is on and none is given."""

    def __init__(self, config=None, num_layers: int | None = None):
        if num_layers is None:
            if config is None:
                raise ValueError("LunaCache needs the model's config (LunaCache(model.config)) or num_layers.")
            num_layers = getattr(config, "decoder_layers", config.num_hidden_layers)
        super().__init__(layers=[LunaCacheLayer() for _ in range(num_layers)])

    def has_previous_state(self, layer_idx: int = 0) -> bool:
        return self.layers[layer_idx].states is not None

    def read(self, layer_idx: int) -> list[torch.Tensor] | None:
        """The layer's states, None before its first token."""
        return self.layers[layer_idx].states

    def write(self, layer_idx: int, states, consumed_length: int) -> None:
        """Store a layer's states and count the positions it consumed (padding included) as `get_seq_length()`:
        `generate()` reads it to feed only the new tokens when it continues from a cache that already holds some."""
        layer = self.layers[layer_idx]
        layer.states = list(states)
        layer.consumed_length += consumed_length


class LunaCacheForGeneration:
    """`generate()` gives a model without a cache of its own an empty `DynamicCache` of keys and values (or none, and
    then refuses chunked prefill): Luna's models give it their `LunaCache` instead, via `empty_cache()`. Assisted
    generation, which rolls the cache back, is refused before anything runs."""

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, *args, **kwargs):
        if str(getattr(generation_mode, "value", generation_mode)) == "assisted_generation":
            raise ValueError(CANNOT_ROLL_BACK)
        given = any(model_kwargs.get(name) is not None for name in ("cache", "past_key_values"))
        wanted = generation_config.use_cache is not False and generation_config.cache_implementation is None
        if wanted and not given:  # a cache given under either name, or another implementation asked for: theirs
            model_kwargs[CACHE_OUTPUT_NAME] = self.empty_cache()
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, generation_mode, *args, **kwargs)


class LunaCausalAttention(nn.Module):
    """Luna causal attention (paper §3.3; the authors' `LunarCausalAttention`). Per head, with s = head_dim^-0.5,
    t the number of real tokens up to position t and f(x, y, z)_t = (1/t) x_t sum_{j<=t} y_j^T z_j (paper Eq. 7):

        A = ω(pack_key_proj(X) · (s · pack_query_proj(P))^T)     n x l, zero at padding (dropout in training)
        W = softmax_l(f(s · q_proj(X), k(X), A))                  n x l (masked slots of P excluded)
        Y = o_proj(f(W, A, v(X)))

    k = v = kv_proj when tied, else k_proj and v_proj. The authors' names: pq_proj, pc_proj, q_proj, c_proj (k_proj,
    v_proj), out_proj. Their code divides by the raw position and lets padding into the sums; here t counts real
    tokens and padding adds nothing, so that a left-padded row gives the outputs of the row alone.
    """

    def __init__(self, config: LunaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.activation = CAUSAL_ACTIVATIONS[config.causal_activation]
        self.chunk_size = config.causal_chunk_size
        self.dropout_p = config.attention_probs_dropout_prob
        self.pack_query_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.pack_key_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        if config.tie_key_value:
            self.kv_proj = nn.Linear(config.hidden_size, config.hidden_size)
        else:
            self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
            self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def split_heads(self, states: torch.Tensor) -> torch.Tensor:  # (..., length, hidden) -> (..., heads, length, dim)
        return states.unflatten(-1, (-1, self.head_dim)).transpose(-3, -2)

    def forward(self, hidden_states, packed_states, token_mask, token_count, slot_mask=None, cache=None):
        """X (batch, n, hidden), P (l or batch x l, hidden), token_mask (batch, n), token_count (batch, n): real tokens
        up to each position, cached ones included; slot_mask (batch, l), 1 = usable slot. Returns Y and W."""
        past = None if cache is None else cache.read(self.layer_idx)
        if past is None:
            pack_queries = self.split_heads(self.pack_query_proj(packed_states)) * self.scaling
        else:
            pack_queries = past[PACK_QUERIES]
        pack_weights = self.activation(self.split_heads(self.pack_key_proj(hidden_states)) @ pack_queries.mT)
        pack_weights = pack_weights * token_mask[:, None, :, None].to(pack_weights.dtype)
        pack_weights = nn.functional.dropout(pack_weights, p=self.dropout_p, training=self.training)

        query = self.split_heads(self.q_proj(hidden_states)) * self.scaling
        if hasattr(self, "kv_proj"):
            key = value = self.split_heads(self.kv_proj(hidden_states))
        else:
            key, value = self.split_heads(self.k_proj(hidden_states)), self.split_heads(self.v_proj(hidden_states))
        divisor = token_count.clamp(min=1)[:, None, :, None]  # 1 before the first real token: the sums are 0 there
        key_sums, value_sums = (None, None) if past is None else (past[KEY_SUMS], past[VALUE_SUMS])
        scores, key_sums = causal_product(query, key, pack_weights, divisor, key_sums, self.chunk_size)
        if slot_mask is not None:
            scores = scores.masked_fill(slot_mask[:, None, None, :] == 0, float("-inf"))
        weights = nn.functional.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))
        weights = nn.functional.dropout(weights.to(query.dtype), p=self.dropout_p, training=self.training)
        output, value_sums = causal_product(weights, pack_weights, value, divisor, value_sums, self.chunk_size)

        if cache is not None:
            pack_queries = pack_queries.expand(hidden_states.shape[0], *pack_queries.shape[-3:])
            states = (key_sums, value_sums, token_count[:, -1], pack_queries)
            cache.write(self.layer_idx, states, consumed_length=hidden_states.shape[1])
        return self.o_proj(output.transpose(1, 2).flatten(2)), weights


# ---------------------------------------------------------------------------------------------------------------------
# Learned-kernel linear attention ("LUNA: Linear Universal Neural Attention", Shahbazi et al., 2025), unrelated to
# Luna's nested attention above; `config.attention_type="learned_kernel"`. docs/learned-kernel.md.

KERNEL_VALUE_SUMS, KERNEL_NORMALIZER_SUMS = 0, 1  # per cache layer, then TOKEN_COUNT (the decoder reads it)
ENVELOPE_LOG_LIMIT = 30.0  # |log h(x)| <= 30 keeps exp_sqnorm's envelope and the float32 sums finite


class LearnedKernelFeatureMap(nn.Module):
    """The learned feature map phi: R^d -> R^D, D = m * L (paper eq. 11 and its Listing 1), of one attention layer,
    shared by its heads and by queries and keys:

        u_i(x) = w_i^T x + b_i                                  m projections, W (m x d) ~ N(0, 1/d), b = 0
        psi_l(u) = ReLU(a_l^T ReLU(alpha_l u + beta_l) + c_l)   L scalar MLPs of width `kernel_mlp_hidden`
        phi(x) = h(x) / sqrt(m) * [psi_l(u_i(x))]_{i, l}        feature i * L + l; h = 1 unless an envelope is set

    The output ReLU of psi is dropped with `kernel_nonnegative=False`. With `kernel_shared_channels` the L channels
    share psi's hidden layer (one 1 -> hidden -> L MLP: alpha, beta of shape (1, hidden)); otherwise each has its own
    (alpha, beta of shape (L, hidden)). psi's layers start as PyTorch's `nn.Linear` default, as in the listing.

    psi is evaluated exactly without its rows x hidden activations: before its output ReLU, psi_l is a sum of ReLU
    ramps a_lh ReLU(alpha_h u + beta_h), so it is linear between the ramps' kinks u = -beta_h / alpha_h. Per call, the
    slope and intercept of every psi_l on each of the hidden + 1 intervals between the sorted kinks form a small table
    (from the parameters, differentiable), and each scalar u takes its interval's line: a binary search among the
    kinks, then L multiply-adds. The values and the gradients are the MLP's (tested against it; exactly on a kink the
    derivative is the left piece's, where autograd's MLP takes ReLU'(0) = 0); memory per call is
    u and phi (batch x heads x n x m x L floats) plus the interval indices, instead of the MLP's
    batch x heads x n x m x hidden activations (x L when separate), about 0.8 GB per call in float32 at BERT-base size
    (batch 32, n 512, 12 heads, m = 16, hidden 64).

    Everything is computed in float32 (float64 for float64 inputs).
    """

    def __init__(self, config: LunaConfig):
        super().__init__()
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.num_projections = config.kernel_num_projections
        self.nonnegative = config.kernel_nonnegative
        channels, hidden = config.kernel_num_channels, config.kernel_mlp_hidden
        hidden_rows = 1 if config.kernel_shared_channels else channels
        self.projection_weight = nn.Parameter(torch.empty(self.num_projections, self.head_dim))
        self.projection_bias = nn.Parameter(torch.empty(self.num_projections))
        self.channel_hidden_weight = nn.Parameter(torch.empty(hidden_rows, hidden))  # alpha
        self.channel_hidden_bias = nn.Parameter(torch.empty(hidden_rows, hidden))  # beta
        self.channel_output_weight = nn.Parameter(torch.empty(channels, hidden))  # a
        self.channel_output_bias = nn.Parameter(torch.empty(channels))  # c
        # h(x) = exp(gamma ||x||^2), gamma learned from 0 (an inferred form: the paper names h but does not give it).
        self.envelope_scale = nn.Parameter(torch.zeros(())) if config.kernel_envelope == "exp_sqnorm" else None

    def forward(self, states: torch.Tensor, is_key: bool = False) -> torch.Tensor:
        """phi of each row of `states` (..., d), in float32 (float64 for float64 states) (..., D). The envelope h is
        applied to keys only: it cancels between the numerator and denominator of a query's row."""
        states = states.to(torch.promote_types(states.dtype, torch.float32))
        weight, bias = self.projection_weight.to(states.dtype), self.projection_bias.to(states.dtype)
        projected = nn.functional.linear(states, weight, bias)  # u, (..., m)
        channels = self.channel_functions(projected.reshape(-1))  # (rows, L)
        features = channels.reshape(*projected.shape, -1).flatten(-2) * self.num_projections**-0.5
        if is_key and self.envelope_scale is not None:
            log_envelope = self.envelope_scale.to(states.dtype) * states.square().sum(dim=-1, keepdim=True)
            features = features * log_envelope.clamp(-ENVELOPE_LOG_LIMIT, ENVELOPE_LOG_LIMIT).exp()
        return features

    def channel_functions(self, projected: torch.Tensor) -> torch.Tensor:
        """psi_1..L of each scalar in `projected` (rows,), (rows, L), through the table of their linear pieces."""
        alpha, beta, a, c = (
            parameter.to(projected.dtype)
            for parameter in (
                self.channel_hidden_weight,
                self.channel_hidden_bias,
                self.channel_output_weight,
                self.channel_output_bias,
            )
        )  # alpha, beta: (G, hidden), G = 1 (shared) or L; a: (L, hidden); c: (L,)
        # Kinks sorted per group; a flat ramp (alpha = 0) has none (its kink is a harmless extra boundary at 0).
        kinks = torch.where(alpha != 0, -beta / alpha.where(alpha != 0, 1.0), 0.0).detach()
        sorted_kinks, order = kinks.sort(dim=-1)
        rank = order.argsort(dim=-1)[:, None, :]  # (G, 1, hidden): the kink's position among the sorted ones
        # Interval j lies between sorted kinks j - 1 and j. Ramp h is on there if its kink is on the left and it
        # rises (alpha > 0), if its kink is on the right and it falls (alpha < 0), or if it is flat and positive.
        interval = torch.arange(alpha.shape[-1] + 1, device=alpha.device)[None, :, None]  # (1, hidden + 1, 1)
        alpha_, beta_ = alpha[:, None, :], beta[:, None, :]
        rising, falling, flat = alpha_ > 0, alpha_ < 0, alpha_ == 0
        active = (rising & (rank < interval)) | (falling & (rank >= interval)) | (flat & (beta_ > 0))
        active = active.to(alpha.dtype)  # (G, hidden + 1, hidden)
        slopes = (active * alpha_ * a[:, None, :]).sum(dim=-1).T  # (hidden + 1, L)
        intercepts = (active * beta_ * a[:, None, :]).sum(dim=-1).T + c
        # torch.bucketize counts the kinks strictly below u: the index of u's interval.
        positions = [torch.bucketize(projected.detach(), group_kinks) for group_kinks in sorted_kinks]
        if len(positions) == 1:  # shared kinks: one row of the table per scalar (far faster than a gather per channel)
            pieces = torch.cat([slopes, intercepts], dim=-1)[positions[0]]  # (rows, 2L)
            slope, intercept = pieces.chunk(2, dim=-1)
        else:
            index = torch.stack(positions, dim=-1)  # (rows, L)
            slope, intercept = slopes.gather(0, index), intercepts.gather(0, index)
        channels = torch.addcmul(intercept, slope, projected[:, None])
        return torch.relu(channels) if self.nonnegative else channels


class FixedFeatureMap(nn.Module):
    """phi(x) = elu(x) + 1 per head dimension (Katharopoulos et al., 2020), `config.kernel_feature_map="elu_plus_one"`:
    the fixed linearization the learned kernel is measured against (docs/vision.md). No parameters; float32 (float64
    for float64 states), as the learned map."""

    def __init__(self, config: LunaConfig):
        super().__init__()

    def forward(self, states: torch.Tensor, is_key: bool = False) -> torch.Tensor:
        return nn.functional.elu(states.to(torch.promote_types(states.dtype, torch.float32))) + 1


class LearnedKernelAttention(nn.Module):
    """Bidirectional learned-kernel attention: a standard multi-head self-attention (query, key, value and output
    projections of the usual shapes, so that a BERT or RoBERTa layer's weights fit) whose softmax is replaced by the
    kernel kappa(q, k) = phi(q)^T phi(k) of `LearnedKernelFeatureMap` (paper eq. 9; no 1/sqrt(d) temperature, W
    absorbs it). Per head, with mu_j = 1 for real tokens and 0 for padding:

        S = sum_j mu_j phi(k_j) v_j^T     (D x d_v)        z = sum_j mu_j phi(k_j)     (D)
        o_i = phi(q_i)^T S / max(phi(q_i)^T z, eps)

    which equals o = A V with A_ij = mu_j kappa(q_i, k_j) / max(sum_l mu_l kappa(q_i, k_l), eps): with non-negative
    features each row of A is a distribution over the real tokens. The sums and the division are in float32 (also
    under autocast), the output is cast back to the input's dtype after the division. A query whose features are all
    zero gets output 0, not NaN. There is no dropout on attention weights (they are never formed).

    Memory per layer, beyond the projections: phi(Q) and phi(K), 2 x batch x heads x n x D float32, S and z
    (batch x heads x D x (d_v + 1)), plus the feature map's (see `LearnedKernelFeatureMap`); linear in n. Only
    `output_attentions=True` builds the n x n map A (for debugging).
    """

    def __init__(self, config: LunaConfig):
        super().__init__()
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.eps = config.kernel_eps
        self.is_causal = False
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.feature_map = FEATURE_MAPS[getattr(config, "kernel_feature_map", "learned")](config)

    def split_heads(self, states: torch.Tensor) -> torch.Tensor:  # (batch, n, hidden) -> (batch, heads, n, dim)
        return states.unflatten(-1, (-1, self.head_dim)).transpose(1, 2)

    def features(self, hidden_states, token_mask):
        """phi(Q), phi(K) with the padded keys' features zeroed (float32), and V."""
        query = self.split_heads(self.q_proj(hidden_states))
        key = self.split_heads(self.k_proj(hidden_states))
        value = self.split_heads(self.v_proj(hidden_states))
        key_features = self.feature_map(key, is_key=True)
        key_features = key_features * token_mask[:, None, :, None].to(key_features.dtype)
        return self.feature_map(query), key_features, value

    def forward(
        self, hidden_states: torch.Tensor, token_mask: torch.Tensor, output_attentions: bool = False, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """X (batch, n, hidden) and token_mask (batch, n), 1 = real token. Returns the attention's output and, with
        `output_attentions`, the explicit maps A (batch, heads, n, n)."""
        query_features, key_features, value = self.features(hidden_states, token_mask)
        with torch.autocast(hidden_states.device.type, enabled=False):
            value_sums = key_features.mT @ value.to(key_features.dtype)  # S
            normalizer_sums = key_features.sum(dim=-2, keepdim=True).mT  # z, (batch, heads, D, 1)
            denominator = (query_features @ normalizer_sums).clamp(min=self.eps)
            output = ((query_features @ value_sums) / denominator).to(value.dtype)
            weights = None
            if output_attentions:
                scores = query_features @ key_features.mT
                weights = (scores / scores.sum(dim=-1, keepdim=True).clamp(min=self.eps)).to(value.dtype)
        return self.o_proj(output.transpose(1, 2).flatten(2)), weights


FEATURE_MAPS = {"learned": LearnedKernelFeatureMap, "elu_plus_one": FixedFeatureMap}


class LearnedKernelCausalAttention(LearnedKernelAttention):
    """Causal learned-kernel attention for `LunaForCausalLM` (the streaming form; the paper states it exists, the
    recurrence is the standard linear-attention one):

        S_t = S_{t-1} + mu_t phi(k_t) v_t^T,    z_t = z_{t-1} + mu_t phi(k_t)
        o_t = phi(q_t)^T S_t / max(phi(q_t)^T z_t, eps)

    Training and prefill run the chunked parallel form (`causal_product` on [V, 1], chunks of `causal_chunk_size`):
    a masked c x c product within each chunk and the running sums across chunks (one D x (d_v + 1) state per chunk),
    never a batch x heads x n x D x d_v tensor. `generate()` keeps S (batch, heads, D, d_v) and z (batch, heads, D)
    in float32 in the cache: its size does not grow with the context. Padding (left padding in batched generation)
    adds nothing to the sums.
    """

    def __init__(self, config: LunaConfig, layer_idx: int):
        super().__init__(config)
        self.layer_idx = layer_idx
        self.chunk_size = config.causal_chunk_size
        self.is_causal = True

    def forward(self, hidden_states, packed_states, token_mask, token_count, slot_mask=None, cache=None):
        """As `LunaCausalAttention.forward`, whose interface it shares: there is no P, so `packed_states` and
        `slot_mask` are None. Returns the attention's output and None (no weights)."""
        query_features, key_features, value = self.features(hidden_states, token_mask)
        past = None if cache is None else cache.read(self.layer_idx)
        state = None
        if past is not None:  # S and z side by side: z is the sum of phi(k) times the value 1
            state = torch.cat([past[KERNEL_VALUE_SUMS], past[KERNEL_NORMALIZER_SUMS].unsqueeze(-1)], dim=-1)
        with torch.autocast(hidden_states.device.type, enabled=False):
            values_and_ones = torch.cat([value, value.new_ones(*value.shape[:-1], 1)], dim=-1).to(key_features.dtype)
            sums, state = causal_product(query_features, key_features, values_and_ones, None, state, self.chunk_size)
            output = (sums[..., :-1] / sums[..., -1:].clamp(min=self.eps)).to(value.dtype)
        if cache is not None:
            states = (state[..., :-1], state[..., -1], token_count[:, -1])
            cache.write(self.layer_idx, states, consumed_length=hidden_states.shape[1])
        return self.o_proj(output.transpose(1, 2).flatten(2)), None


# The attention of a causal layer by `config.attention_type` (the encoder layer builds its own: `LunaLayer`).
CAUSAL_ATTENTION_CLASSES = {"nested": LunaCausalAttention, "learned_kernel": LearnedKernelCausalAttention}

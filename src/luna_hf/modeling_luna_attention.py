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

Copied next to saved checkpoints for `trust_remote_code`: it imports only torch, transformers and its sibling
`configuration_luna.py`.
"""

import math
from collections.abc import Callable

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs

from .configuration_luna import LunaConfig


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

    def forward(
        self,
        queries: torch.Tensor,
        context: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        query = self.split_heads(self.q_proj(queries))
        if self.tie_key_value:
            key = value = self.split_heads(self.kv_proj(context))
        else:
            key, value = self.split_heads(self.k_proj(context)), self.split_heads(self.v_proj(context))

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
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


KEY_SUMS, VALUE_SUMS, TOKEN_COUNT, PACK_QUERIES = range(4)  # per cache layer (`LunaConfig.number_of_conv_states`)
CAUSAL_ACTIVATIONS = {  # the authors' softplus has beta = ln 2: log2(1 + 2^z), which is 1 at z = 0
    "softplus": lambda scores: nn.functional.softplus(scores, beta=math.log(2.0)),
    "elu": lambda scores: nn.functional.elu(scores) + 1.0,
}


def causal_product(x, y, z, token_count, initial_state, chunk_size: int):
    """Paper Eq. 7 after a state S_0: out_t = (1/t) x_t (S_0 + sum_{j<=t} y_j^T z_j), x and y (..., n, d1), z (..., n,
    d2), t (..., n, 1), S_0 (..., d1, d2) or None. A masked c x c product within each chunk, the running d1 x d2 sums
    across chunks; never n x n nor n x d1 x d2. Sums in (at least) float32. Returns the outputs and the final state."""
    dtype = x.dtype
    x, y, z = (t.to(torch.promote_types(dtype, torch.float32)) for t in (x, y, z))
    length = x.shape[-2]
    if length == 1 and initial_state is not None:  # a decoding step: one rank-1 update of the state
        state = initial_state + y.transpose(-1, -2) @ z
        return (x @ state / token_count.to(x.dtype)).to(dtype), state
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
    return (output / token_count.to(output.dtype)).to(dtype), states_after[..., -1, :, :]


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
        past = self.read_cache(cache)
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
            self.write_cache(cache, states, consumed_length=hidden_states.shape[1])
        return self.o_proj(output.transpose(1, 2).flatten(2)), weights

    def read_cache(self, cache):
        """Key sums (batch, heads, dim, l), value sums (batch, heads, l, dim), token count (batch,), pack queries
        (batch, heads, l, dim); None before the first token."""
        if cache is None or not cache.has_previous_state(self.layer_idx):
            return None
        return [cache.get_recurrent_state(self.layer_idx, index) for index in range(4)]

    def write_cache(self, cache, states, consumed_length: int):
        """Store the states, and count the positions consumed (padding included) as `cache.get_seq_length()`:
        `generate()` reads it to feed only the new tokens when it continues from a cache that already holds some."""
        layer = cache.layers[self.layer_idx]
        for index, state in enumerate(states):
            cache.update_recurrent_state(state, self.layer_idx, state_idx=index)
            # transformers sets this flag and the length in `update_conv_state` only; Luna has no convolution state.
            layer.has_previous_state[index] = True
        layer.cumulative_length_linear.add_(consumed_length)

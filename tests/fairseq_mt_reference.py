"""The authors' encoder-decoder translation model `luna` (fairseq-apollo, 2021: LunaEncoder, LunaEncoderLayer,
LunaDecoder, LunaDecoderLayer, LunarMultiheadAttention, LunarCausalAttention) in plain PyTorch, from a fairseq state
dict under their parameter names, with their incremental decoding.

Written from the description of the authors' computation (docs in /work/shared/notes §2, §3, §7, §8), not from
luna_hf: time-major tensors (T x B x C), fairseq's position table indexed by `make_positions`, the full causal
attention of `luna_causal_reference` (their cumulative-sum form) and, for decoding, their per-step accumulators
(`prev_key_accum_mat`, `prev_value_accum_mat`, `prev_num_steps`) and static cross-attention keys and values.
Evaluation mode: every dropout is the identity.

- Encoder: x = sqrt(C) * embed(tokens) + positions (sinusoidal table with a zero padding row, or learned);
  P = sqrt(C) * projected_embeddings[:L'] + sinusoid(0..L'-1) (no sinusoid with learned positions), L' = min(l,
  longest source) with dynamic projection, slot j of row b masked iff j >= length_b; layers as LunaEncoderLayer
  (post-LN: X = LN(X + Y_X), P = LN_p(P + Y_P), X = LN_f(X + FFN(X)); pre-LN: normalised inputs, then final LNs).
- Decoder layer: X = LN1(X + Causal(X, P)); Xc, Y_P = LunarMHA(X, P, encoder out); X = LN2(X + Xc);
  P = LN2p(P + Y_P); X = LN3(X + FFN(X)); pre-LN normalises the inputs (P before the cross-attention only).
- Output: x @ output_projection.weightᵀ (the shared embedding with --share-all-embeddings).
"""

import math

import torch
import torch.nn.functional as F
from luna_causal_reference import authors_causal_attention


def fairseq_sinusoidal_table(num_embeddings: int, dim: int, padding_idx: int | None) -> torch.Tensor:
    """fairseq's `SinusoidalPositionalEmbedding.get_embedding`: row p = [sin(p w), cos(p w)], row padding_idx 0."""
    half_dim = dim // 2
    frequencies = torch.exp(torch.arange(half_dim, dtype=torch.float) * -(math.log(10000) / (half_dim - 1)))
    angles = torch.arange(num_embeddings, dtype=torch.float).unsqueeze(1) * frequencies.unsqueeze(0)
    table = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1).view(num_embeddings, -1)
    if dim % 2 == 1:
        table = torch.cat([table, torch.zeros(num_embeddings, 1)], dim=1)
    if padding_idx is not None:
        table[padding_idx, :] = 0
    return table


def make_positions(tokens: torch.Tensor, padding_idx: int) -> torch.Tensor:
    mask = tokens.ne(padding_idx).int()
    return (torch.cumsum(mask, dim=1).type_as(mask) * mask).long() + padding_idx


class FairseqLunaMT:
    """The `luna` model of a state dict; `forward` is teacher forcing, `decode_incrementally` step by step."""

    def __init__(self, state, num_heads, padding_idx=1, normalize_before=False, dynamic_projection=True,
                 scale_embedding=True):
        self.state = state
        self.num_heads = num_heads
        self.padding_idx = padding_idx
        self.normalize_before = normalize_before
        self.dynamic_projection = dynamic_projection
        self.dim = state["encoder.embed_tokens.weight"].shape[1]
        self.scale = math.sqrt(self.dim) if scale_embedding else 1.0  # --no-scale-embedding: 1
        self.learned_positions = "encoder.embed_positions.weight" in state

    # ---- building blocks ---------------------------------------------------------------------------------------
    def linear(self, x, name):
        return F.linear(x, self.state[name + ".weight"], self.state.get(name + ".bias"))

    def layer_norm(self, x, name):
        return F.layer_norm(x, x.shape[-1:], self.state[name + ".weight"], self.state[name + ".bias"], eps=1e-5)

    def heads(self, x):  # (len, B, C) -> (len, B, H, d)
        return x.reshape(*x.shape[:2], self.num_heads, self.dim // self.num_heads)

    def attend(self, queries, keys, values, key_mask, upcast):
        scores = torch.einsum("qbhd,kbhd->bhqk", queries, keys)
        if key_mask is not None:
            scores = scores.masked_fill(key_mask[:, None, None, :], float("-inf"))
        weights = torch.softmax(scores.float() if upcast else scores, dim=-1).type_as(scores)
        out = torch.einsum("bhqk,kbhd->qbhd", weights, values)
        return out.reshape(*out.shape[:2], self.dim)

    def unpack_key_value(self, prefix, packed):
        tied = prefix + "c_proj.weight" in self.state
        keys = self.heads(self.linear(packed, prefix + ("c_proj" if tied else "k_proj")))
        return keys, keys if tied else self.heads(self.linear(packed, prefix + "v_proj"))

    def lunar_multihead_attention(self, prefix, query, pquery, context, context_mask, pcontext_mask, static=None):
        """LunarMultiheadAttention: returns (out, Y_P, (keys, values) of the unpack). With `static` (cached keys and
        values), no pack is computed and Y_P is None."""
        scaling = (self.dim // self.num_heads) ** -0.5
        packed = None
        if static is None:
            tied = prefix + "pc_proj.weight" in self.state
            pack_keys = self.heads(self.linear(context, prefix + ("pc_proj" if tied else "pk_proj")))
            pack_values = pack_keys if tied else self.heads(self.linear(context, prefix + "pv_proj"))
            pq = self.heads(self.linear(pquery, prefix + "pq_proj")) * scaling
            packed = self.attend(pq, pack_keys, pack_values, context_mask, upcast=False)
            static = self.unpack_key_value(prefix, packed)
        q = self.heads(self.linear(query, prefix + "q_proj")) * scaling
        out = self.linear(self.attend(q, *static, pcontext_mask, upcast=True), prefix + "out_proj")
        return out, packed, static

    def feed_forward(self, x, prefix):
        return self.linear(torch.relu(self.linear(x, prefix + "fc1")), prefix + "fc2")

    def embed_tokens(self, tokens, side):
        positions = make_positions(tokens, self.padding_idx)
        if self.learned_positions:
            position_table = self.state[f"{side}.embed_positions.weight"]
        else:
            position_table = fairseq_sinusoidal_table(int(positions.max()) + 1, self.dim, self.padding_idx)
        x = self.scale * self.state[f"{side}.embed_tokens.weight"][tokens] + position_table[positions]
        return x.transpose(0, 1)  # T x B x C

    # ---- encoder -----------------------------------------------------------------------------------------------
    def encoder_layer(self, i, x, px, token_mask, slot_mask):
        layer = f"encoder.layers.{i}."
        residual, presidual = x, px
        if self.normalize_before:
            x = self.layer_norm(x, layer + "self_attn_layer_norm")
            px = self.layer_norm(px, layer + "self_atten_proj_layer_norm")
        x, px, _ = self.lunar_multihead_attention(layer + "self_attn.", x, px, x, token_mask, slot_mask)
        x, px = residual + x, presidual + px
        if not self.normalize_before:
            x = self.layer_norm(x, layer + "self_attn_layer_norm")
            px = self.layer_norm(px, layer + "self_atten_proj_layer_norm")
        residual = x
        if self.normalize_before:
            x = self.layer_norm(x, layer + "final_layer_norm")
        x = residual + self.feed_forward(x, layer)
        if not self.normalize_before:
            x = self.layer_norm(x, layer + "final_layer_norm")
        return x, px

    def encode(self, src_tokens):
        """Returns (encoder out T x B x C, P L' x B x C, token padding mask B x T, slot mask B x L' or None)."""
        token_mask = src_tokens.eq(self.padding_idx)
        lengths = (~token_mask).sum(dim=1)
        projected = self.state["encoder.projected_embeddings"]
        length = min(projected.shape[0], int(lengths.max())) if self.dynamic_projection else projected.shape[0]
        px = self.scale * projected[:length]
        if not self.learned_positions:
            px = px + fairseq_sinusoidal_table(length, self.dim, None)
        px = px.unsqueeze(1).expand(length, src_tokens.shape[0], self.dim)
        slot_mask = torch.arange(length)[None, :] >= lengths[:, None] if self.dynamic_projection else None
        x = self.embed_tokens(src_tokens, "encoder")
        layers = {int(k.split(".")[2]) for k in self.state if k.startswith("encoder.layers.")}
        for i in sorted(layers):
            x, px = self.encoder_layer(i, x, px, token_mask, slot_mask)
        if self.normalize_before:
            x, px = self.layer_norm(x, "encoder.layer_norm"), self.layer_norm(px, "encoder.proj_layer_norm")
        return x, px, token_mask, slot_mask

    # ---- decoder -----------------------------------------------------------------------------------------------
    def decoder_layer(self, i, x, px, encoded, layer_cache=None):
        """One LunaDecoderLayer. `layer_cache` (a dict, incremental decoding): x is one position; px is None once
        the layer's states are cached."""
        enc_out, token_mask, slot_mask = encoded
        layer = f"decoder.layers.{i}."
        residual = x
        if self.normalize_before:
            x = self.layer_norm(x, layer + "self_attn_layer_norm")
        if layer_cache is None:
            prefix = layer + "self_attn."
            causal_state = {k[len(prefix) :]: v for k, v in self.state.items() if k.startswith(prefix)}
            x = authors_causal_attention(causal_state, x, px, self.num_heads, slot_mask)
        else:
            x = self.causal_step(layer + "self_attn.", x, px, slot_mask, layer_cache)
        x = residual + x
        if not self.normalize_before:
            x = self.layer_norm(x, layer + "self_attn_layer_norm")

        residual, presidual = x, px
        if self.normalize_before:
            x = self.layer_norm(x, layer + "encoder_attn_layer_norm")
            px = self.layer_norm(px, layer + "encoder_atten_proj_layer_norm") if px is not None else None
        static = None if layer_cache is None else layer_cache.get("static")
        x, packed, static = self.lunar_multihead_attention(
            layer + "encoder_attn.", x, px, enc_out, token_mask, slot_mask, static=static
        )
        if layer_cache is not None:
            layer_cache["static"] = static
        x = residual + x
        px = presidual + packed if packed is not None else None
        if not self.normalize_before:
            x = self.layer_norm(x, layer + "encoder_attn_layer_norm")
            px = self.layer_norm(px, layer + "encoder_atten_proj_layer_norm") if px is not None else None

        residual = x
        if self.normalize_before:
            x = self.layer_norm(x, layer + "final_layer_norm")
        x = residual + self.feed_forward(x, layer)
        if not self.normalize_before:
            x = self.layer_norm(x, layer + "final_layer_norm")
        return x, px

    def causal_step(self, prefix, x, px, slot_mask, cache):
        """LunarCausalAttention with an incremental state, for one position x (1 x B x C): the pack queries of P are
        cached on the first step; per step one rank-1 update of the key and value accumulators, divided by the
        number of steps."""
        head_dim = self.dim // self.num_heads
        scaling = head_dim**-0.5
        batch = x.shape[1]

        def heads(t):  # (1, B, C) -> (B, H, d)
            return t[0].reshape(batch, self.num_heads, head_dim)

        if "pquery" not in cache:
            cache["pquery"] = self.heads(self.linear(px, prefix + "pq_proj")).permute(1, 2, 0, 3) * scaling  # B H L d
            length = px.shape[0]
            cache["key_accum"] = x.new_zeros(batch, self.num_heads, head_dim, length)
            cache["value_accum"] = x.new_zeros(batch, self.num_heads, length, head_dim)
            cache["steps"] = 0
        cache["steps"] += 1
        pack_key = heads(self.linear(x, prefix + "pc_proj"))
        pack_weights = F.softplus(torch.einsum("bhd,bhld->bhl", pack_key, cache["pquery"]), beta=math.log(2.0))
        q = heads(self.linear(x, prefix + "q_proj")) * scaling
        if prefix + "c_proj.weight" in self.state:
            k = v = heads(self.linear(x, prefix + "c_proj"))
        else:
            k, v = heads(self.linear(x, prefix + "k_proj")), heads(self.linear(x, prefix + "v_proj"))
        cache["key_accum"] = cache["key_accum"] + torch.einsum("bhd,bhl->bhdl", k, pack_weights)
        cache["value_accum"] = cache["value_accum"] + torch.einsum("bhl,bhd->bhld", pack_weights, v)
        scores = torch.einsum("bhd,bhdl->bhl", q, cache["key_accum"]) / cache["steps"]
        if slot_mask is not None:
            scores = scores.masked_fill(slot_mask[:, None, :], float("-inf"))
        weights = torch.softmax(scores.float(), dim=-1).type_as(scores)
        out = torch.einsum("bhl,bhld->bhd", weights, cache["value_accum"]) / cache["steps"]
        return self.linear(out.reshape(1, batch, self.dim), prefix + "out_proj")

    def decoder_layers(self):
        return sorted({int(k.split(".")[2]) for k in self.state if k.startswith("decoder.layers.")})

    def output(self, x):
        if self.normalize_before:
            x = self.layer_norm(x, "decoder.layer_norm")
        return F.linear(x.transpose(0, 1), self.state["decoder.output_projection.weight"])  # B x T x V

    def forward(self, src_tokens, prev_output_tokens):
        """Teacher-forced logits (B x T x V) for the target prefix `prev_output_tokens` (starting with </s>)."""
        enc_out, px, token_mask, slot_mask = self.encode(src_tokens)
        x = self.embed_tokens(prev_output_tokens, "decoder")
        for i in self.decoder_layers():
            x, px = self.decoder_layer(i, x, px, (enc_out, token_mask, slot_mask))
        return self.output(x)

    def decode_incrementally(self, src_tokens, prev_output_tokens):
        """The same logits, one target position at a time with the authors' incremental state."""
        enc_out, encoder_px, token_mask, slot_mask = self.encode(src_tokens)
        caches = {i: {} for i in self.decoder_layers()}
        logits = []
        for t in range(prev_output_tokens.shape[1]):
            # fairseq embeds the whole prefix for its positions, then keeps the last one.
            x = self.embed_tokens(prev_output_tokens[:, : t + 1], "decoder")[-1:]
            px = encoder_px if t == 0 else None
            for i in self.decoder_layers():
                x, px = self.decoder_layer(i, x, px, (enc_out, token_mask, slot_mask), caches[i])
            logits.append(self.output(x))
        return torch.cat(logits, dim=1)

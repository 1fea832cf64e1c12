"""The authors' luna_bert forward pass (fairseq-apollo, 2021), in plain PyTorch, straight from a fairseq state dict.

Written from the description of the authors' computation (LunaSentenceEncoder, LunaSentenceEncoderLayer,
LunarMultiheadAttention, LunaLMHead, the [CLS] classification head), not from luna_hf: it reads fairseq's tensor
names and works time-major (T x B x C) as fairseq does, with einsum over an explicit (heads, head_dim) split, so
that it shares no code with the model under test. Evaluation mode: every dropout is the identity.

The points the port must reproduce (and this reference does):
- padding is `tokens == padding_idx`; positions count non-pad tokens from padding_idx + 1, pads use row padding_idx;
- x = LN_emb(embed_tokens + embed_positions); P = LN_proj(projected_embeddings[:L']), no position term, where
  L' = min(l, longest real length) with dynamic projection (slot j of row b masked iff j >= length_b), else l;
- pad rows of x and masked slots of P are zeroed after the embedding LayerNorms;
- per layer (post-LN): pack Y_P = softmax(pq_proj(P)·k(X)ᵀ / sqrt(d_head)) v(X) over the non-pad tokens, with no
  output projection; unpack Y_X = out_proj(softmax(q_proj(X)·k(Y_P)ᵀ / sqrt(d_head)) v(Y_P)) over unmasked slots;
  "tied" means one projection gives both keys and values (pc_proj for the pack, c_proj for the unpack);
  X = LN_attn(X + Y_X); P = LN_p(P + Y_P); X = LN_ffn(X + fc2(gelu(fc1(X)))); exact erf GELU in float32;
- LM head: layer_norm(gelu(dense(x))) @ lm_head.weightᵀ + lm_head.bias;
- classification heads, out_proj(tanh(dense(s))), where the head's name decides the sentence vector s:
  `pooling_classification_head`: in_proj(P) with masked slots set to -inf, maximum over slots;
  `attention_classification_head`: layernorm(attn(query x[:, 0], keys/values P, masked slots excluded)), attn being
  fairseq's MultiheadAttention (q_proj scaled by sqrt(d_head)^-1 after its bias, separate k_proj, v_proj, out_proj);
  any other name: x[:, 0] (the [CLS] head).
"""

import math

import torch
import torch.nn.functional as F

ENCODER = "encoder.sentence_encoder."


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """fairseq computes GELU and the unpack softmax in float32 (a no-op for float32 inputs). Float64 inputs stay in
    float64 here, so that a float64 comparison can show two computations identical beyond float32 rounding."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def exact_gelu(x: torch.Tensor) -> torch.Tensor:
    """fairseq's `gelu`: the erf form, computed in (at least) float32 and cast back."""
    y = at_least_float32(x)
    return (y * 0.5 * (1.0 + torch.erf(y / math.sqrt(2.0)))).type_as(x)


def fairseq_luna_forward(
    state: dict,
    tokens: torch.Tensor,
    num_heads: int,
    padding_idx: int = 1,
    dynamic_projection: bool = True,
    classification_head: str | None = None,
) -> dict:
    """Run luna_bert on `tokens` (B x T, right- or left-padded with `padding_idx`).

    Returns a dict with `x` (B x T x C, final token states), `px` (B x L' x C, final packed states),
    `px_padding_mask` (B x L', True = masked slot, or None), `logits` (B x T x V, LM head) and, when
    `classification_head` names a classification head of the state dict, `head_logits` (B x classes).
    """

    def param(name):
        return state[name]

    def linear(x, name):
        return F.linear(x, param(name + ".weight"), param(name + ".bias"))

    def layer_norm(x, name):
        return F.layer_norm(x, x.shape[-1:], param(name + ".weight"), param(name + ".bias"), eps=1e-5)

    pad = tokens.eq(padding_idx)  # B x T
    lengths = (~pad).sum(dim=1)
    projected = param(ENCODER + "projected_embeddings")
    slots = min(projected.shape[0], int(lengths.max())) if dynamic_projection else projected.shape[0]
    slot_mask = torch.arange(slots)[None, :] >= lengths[:, None] if dynamic_projection else None
    # fairseq drops an all-False mask; masking nothing is the same computation.
    token_mask = pad if pad.any() else None
    if slot_mask is not None and not slot_mask.any():
        slot_mask = None

    real = (~pad).long()
    positions = torch.cumsum(real, dim=1) * real + padding_idx
    x = param(ENCODER + "embed_tokens.weight")[tokens] + param(ENCODER + "embed_positions.weight")[positions]
    x = layer_norm(x, ENCODER + "emb_layer_norm")
    p = layer_norm(projected[:slots], ENCODER + "proj_emb_layer_norm").expand(tokens.shape[0], -1, -1)
    if token_mask is not None:
        x = x.masked_fill(token_mask[..., None], 0.0)
    if slot_mask is not None:
        p = p.masked_fill(slot_mask[..., None], 0.0)
    x, p = x.transpose(0, 1), p.transpose(0, 1)  # time-major: T x B x C, L' x B x C

    hidden = x.shape[-1]
    head_dim = hidden // num_heads

    def heads(t):  # (len, B, C) -> (len, B, H, d)
        return t.reshape(*t.shape[:2], num_heads, head_dim)

    def attend(queries, keys, values, key_mask, upcast):
        """queries (Lq,B,H,d) already scaled, keys/values (Lk,B,H,d), key_mask (B,Lk) True = excluded."""
        scores = torch.einsum("qbhd,kbhd->bhqk", queries, keys)
        if key_mask is not None:
            scores = scores.masked_fill(key_mask[:, None, None, :], float("-inf"))
        weights = torch.softmax(at_least_float32(scores) if upcast else scores, dim=-1).type_as(scores)
        out = torch.einsum("bhqk,kbhd->qbhd", weights, values)
        return out.reshape(*out.shape[:2], hidden)

    layer_ids = sorted({int(k[len(ENCODER) :].split(".")[1]) for k in state if k.startswith(ENCODER + "layers.")})
    for i in layer_ids:
        a = f"{ENCODER}layers.{i}.self_attn."
        tied = a + "pc_proj.weight" in state
        # Pack: P queries the tokens (pads excluded); softmax in the input dtype. Raw result, no output projection.
        pack_keys = heads(linear(x, a + ("pc_proj" if tied else "pk_proj")))
        pack_values = pack_keys if tied else heads(linear(x, a + "pv_proj"))
        packed = attend(heads(linear(p, a + "pq_proj")) * head_dim**-0.5, pack_keys, pack_values, token_mask, False)
        # Unpack: the tokens query the packed context (unused slots excluded); softmax in float32.
        unpack_keys = heads(linear(packed, a + ("c_proj" if tied else "k_proj")))
        unpack_values = unpack_keys if tied else heads(linear(packed, a + "v_proj"))
        unpacked = attend(heads(linear(x, a + "q_proj")) * head_dim**-0.5, unpack_keys, unpack_values, slot_mask, True)
        unpacked = linear(unpacked, a + "out_proj")

        layer = f"{ENCODER}layers.{i}."
        x = layer_norm(x + unpacked, layer + "self_attn_layer_norm")
        p = layer_norm(p + packed, layer + "self_atten_proj_layer_norm")
        feed_forward = linear(exact_gelu(linear(x, layer + "fc1")), layer + "fc2")
        x = layer_norm(x + feed_forward, layer + "final_layer_norm")

    if classification_head is not None:  # still time-major here
        h = f"classification_heads.{classification_head}."
        if classification_head == "pooling_classification_head":
            slots = linear(p, h + "in_proj")  # L' x B x C
            if slot_mask is not None:
                slots = slots.masked_fill(slot_mask.t()[..., None], float("-inf"))
            sentence = slots.max(dim=0).values
        elif classification_head == "attention_classification_head":
            query = heads(linear(x[:1], h + "attn.q_proj")) * head_dim**-0.5  # 1 x B x H x d
            keys, values = heads(linear(p, h + "attn.k_proj")), heads(linear(p, h + "attn.v_proj"))
            attended = linear(attend(query, keys, values, slot_mask, True), h + "attn.out_proj")
            sentence = layer_norm(attended[0], h + "layernorm")
        else:
            sentence = x[0]
        head_logits = linear(torch.tanh(linear(sentence, h + "dense")), h + "out_proj")

    x, p = x.transpose(0, 1), p.transpose(0, 1)
    out = {"x": x, "px": p, "px_padding_mask": slot_mask}
    if "encoder.lm_head.dense.weight" in state:
        features = layer_norm(exact_gelu(linear(x, "encoder.lm_head.dense")), "encoder.lm_head.layer_norm")
        out["logits"] = F.linear(features, param("encoder.lm_head.weight")) + param("encoder.lm_head.bias")
    if classification_head is not None:
        out["head_logits"] = head_logits
    return out

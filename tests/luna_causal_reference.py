"""The authors' causal Luna attention (`LunarCausalAttention`, fairseq-apollo 2021) in plain PyTorch, from a state
dict under their parameter names.

Written from the description of the authors' computation (paper §3.3, their code's conventions), not from luna_hf:
time-major tensors (T x B x C) with fairseq's head split (row b * H + h), and their default "parallel" form, which
builds the outer product y_j^T z_j of every position and sums them with a cumulative sum over time (a
B*H x T x d1 x d2 tensor, the memory the chunked form avoids). Evaluation mode: every dropout is the identity.

What it computes, per head, with s = head_dim^-0.5 and t the 1-based position:
- pq = s * pq_proj(P) (after the bias); pack weights A = omega(pc_proj(X) · pqᵀ) (T x L; pack keys not scaled), with
  omega the softplus of beta = ln 2, log2(1 + 2^z), or elu(z) + 1;
- q = s * q_proj(X); tied: k = v = c_proj(X), untied: k = k_proj(X), v = v_proj(X);
- f(x, y, z)_t = (1/t) x_t · sum_{j<=t} y_jᵀ z_j;
- scores = f(q, k, A) (T x L), slots where `pkey_padding_mask` is True set to -inf, softmax over L in float32;
- out = out_proj(f(W, A, v)), heads concatenated.
The token padding mask is ignored and t is the raw position, as in the authors' code: padding after the real tokens
leaves the real tokens' outputs as they are; padding before them does not.
"""

import math

import torch
import torch.nn.functional as F


def authors_causal_product(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """f(x, y, z) for x, y (BH, T, d1) and z (BH, T, d2): cumulative sum of the per-position outer products."""
    outer = y.unsqueeze(3) * z.unsqueeze(2)  # BH x T x d1 x d2
    running = outer.cumsum(dim=1)
    positions = torch.arange(1, x.shape[1] + 1, dtype=x.dtype, device=x.device)
    return torch.einsum("btd,btde->bte", x, running) / positions[None, :, None]


def authors_causal_attention(
    state: dict,
    query: torch.Tensor,
    pquery: torch.Tensor,
    num_heads: int,
    pkey_padding_mask: torch.Tensor | None = None,
    activation: str = "softplus",
) -> torch.Tensor:
    """`LunarCausalAttention.forward(query, pquery, pkey_padding_mask=...)`: query X (T x B x C), pquery P (L x B x C),
    pkey_padding_mask (B x L, True = masked slot). Returns the output (T x B x C)."""

    def linear(x, name):
        return F.linear(x, state[name + ".weight"], state[name + ".bias"])

    length, batch, width = query.shape
    plength = pquery.shape[0]
    head_dim = width // num_heads
    scaling = head_dim**-0.5

    def heads(x):  # (len, B, C) -> (B*H, len, K)
        return x.reshape(x.shape[0], batch * num_heads, head_dim).transpose(0, 1)

    pq = heads(linear(pquery, "pq_proj")) * scaling
    pack_scores = torch.bmm(heads(linear(query, "pc_proj")), pq.transpose(1, 2))  # B*H x T x L
    if activation == "softplus":
        pack_weights = F.softplus(pack_scores, beta=math.log(2.0))
    else:
        pack_weights = F.elu(pack_scores) + 1.0

    q = heads(linear(query, "q_proj")) * scaling
    if "c_proj.weight" in state:
        k = v = heads(linear(query, "c_proj"))
    else:
        k, v = heads(linear(query, "k_proj")), heads(linear(query, "v_proj"))

    scores = authors_causal_product(q, k, pack_weights)  # B*H x T x L
    if pkey_padding_mask is not None:
        scores = scores.view(batch, num_heads, length, plength)
        scores = scores.masked_fill(pkey_padding_mask[:, None, None, :].bool(), float("-inf"))
        scores = scores.view(batch * num_heads, length, plength)
    weights = F.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1).type_as(scores)
    attended = authors_causal_product(weights, pack_weights, v)  # B*H x T x K
    return linear(attended.transpose(0, 1).reshape(length, batch, width), "out_proj")

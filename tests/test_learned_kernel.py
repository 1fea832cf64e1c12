"""attention_type="learned_kernel" (Shahbazi et al., 2025, docs/learned-kernel.md): the feature map and both forms
of the attention against references written here from the paper's equations (float64), padding, zero features,
bf16, the causal cache, every head, saving, remote code, training, and bad configurations."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

from luna_hf import (
    LunaCache,
    LunaConfig,
    LunaForCausalLM,
    LunaForMaskedLM,
    LunaForMultipleChoice,
    LunaForQuestionAnswering,
    LunaForSequenceClassification,
    LunaForTokenClassification,
    LunaModel,
)
from luna_hf.modeling_luna_attention import LearnedKernelAttention, LearnedKernelCausalAttention
from luna_hf.transformers_compat import enable_activation_checkpointing

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hub_fixture  # noqa: E402

VOCAB = 40
PAD = 1
CODE_FILES = {"configuration_luna.py", "modeling_luna.py", "modeling_luna_attention.py", "modeling_luna_causal.py",
              "transformers_compat.py"}


def kernel_config(**overrides) -> LunaConfig:
    values = dict(
        attention_type="learned_kernel", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, max_position_embeddings=130, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        kernel_num_projections=5, kernel_num_channels=3, kernel_mlp_hidden=7, causal_chunk_size=4,
    )  # fmt: skip
    values.update(overrides)
    return LunaConfig(**values)


def random_ids(batch, length, seed=0):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def randomize_envelope(attention, seed=0):
    """gamma starts at 0 (h = 1): give it a value so that the envelope matters."""
    if getattr(attention.feature_map, "envelope_scale", None) is not None:
        with torch.no_grad():
            attention.feature_map.envelope_scale.fill_(0.05 + 0.01 * seed)


def attention_module(cls, seed=0, **overrides):
    torch.manual_seed(seed)
    config = kernel_config(**overrides)
    model_class = LunaForCausalLM if cls is LearnedKernelCausalAttention else LunaModel
    if model_class is LunaForCausalLM:
        config = kernel_config(is_decoder=True, **overrides)
    attention = model_class(config).double().eval().get_submodule(
        "luna.layers.0.attention" if model_class is LunaForCausalLM else "layers.0.attention"
    )
    assert type(attention) is cls
    randomize_envelope(attention, seed)
    return attention


# ---------------------------------------------------------------------------------------------------------------------
# Independent reference: paper eq. 11 (the feature map) and eq. 9 (the attention) from the parameters, one scalar MLP
# at a time, h applied to queries and keys alike (the model applies it to keys only: it cancels on queries).


def reference_features(feature_map, x: torch.Tensor) -> torch.Tensor:
    """phi(x) for x (n, d): phi(x)_{i*L + l} = h(x)/sqrt(m) psi_l(w_i^T x + b_i)."""
    weight, bias = feature_map.projection_weight.double(), feature_map.projection_bias.double()
    alpha, beta = feature_map.channel_hidden_weight.double(), feature_map.channel_hidden_bias.double()
    a, c = feature_map.channel_output_weight.double(), feature_map.channel_output_bias.double()
    m, channels = weight.shape[0], a.shape[0]
    x = x.double()
    features = torch.zeros(x.shape[0], m * channels, dtype=torch.float64)
    for i in range(m):
        u = x @ weight[i] + bias[i]  # (n,)
        for channel in range(channels):
            row = 0 if alpha.shape[0] == 1 else channel  # shared: one hidden layer for every channel
            hidden = torch.relu(u[:, None] * alpha[row] + beta[row])  # (n, hidden)
            psi = hidden @ a[channel] + c[channel]
            if feature_map.nonnegative:
                psi = torch.relu(psi)
            features[:, i * channels + channel] = psi / math.sqrt(m)
    if feature_map.envelope_scale is not None:
        features = features * torch.exp(feature_map.envelope_scale.double() * x.square().sum(-1, keepdim=True))
    return features


def reference_heads(attention, hidden_states):
    """Per-head queries, keys and values (batch, heads, n, d) from the layer's own projections."""

    def split(states):
        return states.unflatten(-1, (-1, attention.head_dim)).transpose(1, 2)

    with torch.no_grad():
        q, k, v = (split(proj(hidden_states)) for proj in (attention.q_proj, attention.k_proj, attention.v_proj))
    return q, k, v


@torch.no_grad()
def reference_quadratic_attention(attention, hidden_states, token_mask, causal=False, eps=1e-6):
    """o = A V with A_ij = mu_j kappa(q_i, k_j) / max(sum_l mu_l kappa(q_i, k_l), eps), then o_proj."""
    q, k, v = reference_heads(attention, hidden_states)
    batch, heads, n, _ = q.shape
    output = torch.zeros(batch, heads, n, v.shape[-1], dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            kernel = reference_features(attention.feature_map, q[b, h]) @ reference_features(
                attention.feature_map, k[b, h]
            ).T
            kernel = kernel * token_mask[b][None, :].double()
            if causal:
                kernel = kernel.tril()
            weights = kernel / kernel.sum(-1, keepdim=True).clamp(min=eps)
            output[b, h] = weights @ v[b, h].double()
    with torch.no_grad():
        return attention.o_proj(output.transpose(1, 2).flatten(2))


@torch.no_grad()
def reference_recurrence(attention, hidden_states, token_mask, eps=1e-6):
    """The streaming form token by token: S_t = S_{t-1} + mu_t phi(k_t) v_t^T, z_t = z_{t-1} + mu_t phi(k_t)."""
    q, k, v = reference_heads(attention, hidden_states)
    batch, heads, n, dim = q.shape
    output = torch.zeros(batch, heads, n, dim, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            query_features = reference_features(attention.feature_map, q[b, h])
            key_features = reference_features(attention.feature_map, k[b, h])
            sums = torch.zeros(key_features.shape[1], dim, dtype=torch.float64)
            normalizer = torch.zeros(key_features.shape[1], dtype=torch.float64)
            for t in range(n):
                if token_mask[b, t]:
                    sums = sums + torch.outer(key_features[t], v[b, h, t].double())
                    normalizer = normalizer + key_features[t]
                output[b, h, t] = query_features[t] @ sums / max(float(query_features[t] @ normalizer), eps)
    with torch.no_grad():
        return attention.o_proj(output.transpose(1, 2).flatten(2))


# ---------------------------------------------------------------------------------------------------------------------
# The feature map and the bidirectional attention


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("envelope", ["none", "exp_sqnorm"])
@pytest.mark.parametrize("nonnegative", [True, False])
def test_kernel_is_the_reference_feature_inner_product_and_its_gram_matrix_is_psd(shared, envelope, nonnegative):
    attention = attention_module(
        LearnedKernelAttention, kernel_shared_channels=shared, kernel_envelope=envelope, kernel_nonnegative=nonnegative
    )
    x = torch.randn(40, attention.head_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        features = attention.feature_map(x, is_key=True)
    expected = reference_features(attention.feature_map, x)
    torch.testing.assert_close(features, expected, atol=1e-12, rtol=1e-12)
    gram = expected.detach() @ expected.detach().T
    torch.testing.assert_close(gram, gram.T, atol=1e-14, rtol=0)
    assert torch.linalg.eigvalsh(gram).min() >= -1e-10 * gram.trace()
    if nonnegative:
        assert (features >= 0).all()
    # Parameter count of paper §5's note: m(d + 1), plus 2*hidden + L(hidden + 1) shared or L(3*hidden + 1) separate.
    m, channels, hidden, d = 5, 3, 7, attention.head_dim
    count = sum(p.numel() for p in attention.feature_map.parameters()) - (envelope == "exp_sqnorm")
    assert count == m * (d + 1) + (2 * hidden + channels * (hidden + 1) if shared else channels * (3 * hidden + 1))


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("nonnegative", [True, False])
def test_feature_map_gradients_are_the_reference_mlps_gradients(shared, nonnegative):
    attention = attention_module(LearnedKernelAttention, kernel_shared_channels=shared, kernel_nonnegative=nonnegative)
    feature_map = attention.feature_map
    x = torch.randn(60, attention.head_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    x.requires_grad_(True)
    probe = torch.randn(60, 15, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    inputs = [x, *feature_map.parameters()]
    got = torch.autograd.grad((feature_map(x) * probe).sum(), inputs)
    expected = torch.autograd.grad((reference_features(feature_map, x) * probe).sum(), inputs)
    for name, a, b in zip(["x"] + [n for n, _ in feature_map.named_parameters()], got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=name)


@pytest.mark.parametrize("shared", [True, False])
def test_feature_map_handles_flat_ramps_coinciding_kinks_and_an_input_on_a_kink(shared):
    """psi is evaluated through its linear pieces between the kinks -beta/alpha of its ReLU ramps: the edge cases of
    that evaluation against the plain MLP."""
    attention = attention_module(LearnedKernelAttention, kernel_shared_channels=shared)
    feature_map = attention.feature_map
    with torch.no_grad():
        feature_map.channel_hidden_weight[:, :2] = 0.0  # flat ramps: one on (beta > 0), one off (beta < 0)
        feature_map.channel_hidden_bias[:, 0], feature_map.channel_hidden_bias[:, 1] = 0.5, -0.5
        feature_map.channel_hidden_weight[:, 2:4] = torch.tensor([1.0, -2.0])  # rising and falling, same kink 0.25
        feature_map.channel_hidden_bias[:, 2:4] = torch.tensor([-0.25, 0.5])
        feature_map.projection_bias[0] = 0.25  # with x = 0, u_0 lies exactly on that kink
    x = torch.randn(30, attention.head_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    on_kink = torch.zeros(1, attention.head_dim, dtype=torch.float64)
    # Values match on a kink too; its derivative is one-sided there (the left piece's), where autograd's MLP takes
    # ReLU'(0) = 0, so gradients are compared off the kinks.
    torch.testing.assert_close(feature_map(on_kink), reference_features(feature_map, on_kink), atol=1e-12, rtol=0)
    x.requires_grad_(True)
    probe = torch.randn(30, 15, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    inputs = [x, *feature_map.parameters()]
    torch.testing.assert_close(feature_map(x), reference_features(feature_map, x), atol=1e-12, rtol=1e-12)
    got = torch.autograd.grad((feature_map(x) * probe).sum(), inputs)
    expected = torch.autograd.grad((reference_features(feature_map, x) * probe).sum(), inputs)
    for name, a, b in zip(["x"] + [n for n, _ in feature_map.named_parameters()], got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=name)


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("envelope", ["none", "exp_sqnorm"])
def test_linear_form_equals_the_explicit_normalised_quadratic_form(shared, envelope):
    attention = attention_module(LearnedKernelAttention, kernel_shared_channels=shared, kernel_envelope=envelope)
    hidden_states = torch.randn(2, 9, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    token_mask = torch.tensor([[1] * 9, [1] * 6 + [0] * 3])
    with torch.no_grad():
        output, weights = attention(hidden_states, token_mask, output_attentions=True)
    expected = reference_quadratic_attention(attention, hidden_states, token_mask)
    assert (output - expected).abs().max() < 1e-10
    # The returned maps are the explicit A: with non-negative features, a distribution over the real tokens.
    assert weights.shape == (2, 4, 9, 9) and (weights >= 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 9, dtype=torch.float64), atol=1e-12, rtol=0)
    assert (weights[1, :, :, 6:] == 0).all()


def test_every_explicit_attention_row_of_the_model_is_a_distribution_over_the_real_tokens():
    torch.manual_seed(0)
    model = LunaModel(kernel_config()).eval()
    ids = random_ids(3, 8)
    mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3, [0] * 2 + [1] * 6])
    with torch.no_grad():
        outputs = model(ids, attention_mask=mask, output_attentions=True)
    assert len(outputs.attentions) == 2
    for weights in outputs.attentions:
        assert weights.shape == (3, 4, 8, 8) and (weights >= 0).all()
        torch.testing.assert_close(weights.sum(-1), torch.ones(3, 4, 8), atol=1e-5, rtol=0)
        assert (weights.masked_select(mask[:, None, None, :] == 0) == 0).all()


def test_padding_changes_nothing_at_real_tokens_and_padded_keys_get_exactly_zero_gradient():
    torch.manual_seed(0)
    model = LunaModel(kernel_config()).eval()
    ids = random_ids(1, 6)
    padded = torch.cat([ids, torch.full((1, 3), PAD)], dim=1)
    mask = torch.tensor([[1] * 6 + [0] * 3])
    with torch.no_grad():
        alone = model(ids).last_hidden_state
        batched = model(padded, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(batched[:, :6], alone, atol=1e-6, rtol=0)

    attention = attention_module(LearnedKernelAttention)
    hidden_states = torch.randn(2, 7, 32, dtype=torch.float64, requires_grad=True)
    token_mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    output, _ = attention(hidden_states, token_mask)
    output[token_mask.bool()].square().sum().backward()
    assert (hidden_states.grad[1, 4:] == 0).all()  # keys and values (and queries) of the padded positions
    assert (hidden_states.grad[1, :4] != 0).any()


def test_a_query_whose_features_are_all_zero_gives_finite_outputs_and_gradients():
    torch.manual_seed(0)
    model = LunaForSequenceClassification(kernel_config(num_labels=2))
    with torch.no_grad():  # psi's output bias far below zero: the output ReLU zeroes every feature
        for layer in model.luna.layers:
            layer.attention.feature_map.channel_output_bias.fill_(-1e4)
    ids = random_ids(2, 7)
    outputs = model(ids, labels=torch.tensor([0, 1]), output_attentions=True)
    assert all((weights == 0).all() for weights in outputs.attentions)
    outputs.loss.backward()
    assert torch.isfinite(outputs.logits).all() and torch.isfinite(outputs.loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_bfloat16_inputs_give_bfloat16_outputs_computed_with_float32_sums():
    attention = attention_module(LearnedKernelAttention).float()
    hidden_states = torch.randn(2, 50, 32, generator=torch.Generator().manual_seed(3))
    token_mask = torch.ones(2, 50, dtype=torch.long)
    with torch.no_grad():
        expected, _ = attention(hidden_states, token_mask)
        low, _ = attention.to(torch.bfloat16)(hidden_states.bfloat16(), token_mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast, _ = attention.float()(hidden_states, token_mask)
    assert low.dtype == torch.bfloat16 and autocast.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), expected, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(autocast.float(), expected, atol=3e-2, rtol=3e-2)


def test_gradient_checkpointing_changes_no_gradient():
    ids, labels = random_ids(2, 9), random_ids(2, 9, seed=1)
    gradients = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = LunaForMaskedLM(kernel_config(kernel_shared_channels=False)).train()
        if checkpointing:
            enable_activation_checkpointing(model)
        model(ids, labels=labels).loss.backward()
        gradients.append({name: p.grad for name, p in model.named_parameters() if p.grad is not None})
    for other in gradients[1:]:
        assert other.keys() == gradients[0].keys()
        for name, gradient in gradients[0].items():
            torch.testing.assert_close(other[name], gradient, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# The causal form


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 10, 16])  # n = 10: 4 does not divide it, 16 exceeds it
def test_chunked_causal_form_equals_the_recurrence_and_the_masked_quadratic_form(chunk_size):
    attention = attention_module(
        LearnedKernelCausalAttention, causal_chunk_size=chunk_size, kernel_envelope="exp_sqnorm"
    )
    hidden_states = torch.randn(2, 10, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    token_mask = torch.tensor([[1] * 10, [0] * 3 + [1] * 7])  # left padding, as in batched generation
    token_count = token_mask.cumsum(1)
    with torch.no_grad():
        output, _ = attention(hidden_states, None, token_mask, token_count)
    recurrence = reference_recurrence(attention, hidden_states, token_mask)
    quadratic = reference_quadratic_attention(attention, hidden_states, token_mask, causal=True)
    assert (recurrence - quadratic).abs().max() < 1e-10  # the two references agree
    assert (output - recurrence).abs().max() < 1e-10


def causal_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return LunaForCausalLM(kernel_config(is_decoder=True, **overrides)).eval()


def test_future_tokens_never_change_earlier_outputs():
    model = causal_model()
    ids = random_ids(1, 12)
    changed = ids.clone()
    changed[0, 7:] = random_ids(1, 5, seed=9)
    with torch.no_grad():
        logits, other = model(ids).logits, model(changed).logits
    assert torch.equal(logits[:, :7], other[:, :7])
    assert not torch.allclose(logits[:, 7:], other[:, 7:])


def test_cached_decoding_reproduces_the_full_forward_with_a_constant_size_float32_cache():
    model = causal_model()
    ids = random_ids(2, 15)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    with torch.no_grad():
        full = model(ids, attention_mask=mask, use_cache=False).logits
        cache = LunaCache(model.config)
        steps = [model(ids[:, :6], attention_mask=mask[:, :6], cache=cache).logits]  # a prefill, then one by one
        sizes = [tuple(state.shape) for state in cache.layers[1].states]
        for t in range(6, 15):
            steps.append(model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache).logits)
    assert (torch.cat(steps, dim=1) - full).abs()[mask.bool()].max() <= 1e-5
    # S (batch, heads, D, d_v), z (batch, heads, D), the token count: whatever the context.
    assert sizes == [tuple(state.shape) for state in cache.layers[1].states]
    assert sizes == [(2, 4, 15, 8), (2, 4, 15), (2,)]
    assert [state.dtype for state in cache.layers[1].states][:2] == [torch.float32] * 2
    assert cache.layers[1].states[2].tolist() == [12, 15]
    assert cache.get_seq_length() == 15


def test_generate_with_the_cache_matches_decoding_without_it_greedy_and_beam_search():
    model = causal_model(seed=1)
    prompt = random_ids(2, 5)
    generated = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    ids = prompt
    for _ in range(6):
        with torch.no_grad():
            next_token = model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_token], dim=1)
    assert torch.equal(generated, ids)
    beams = dict(max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    assert torch.equal(model.generate(prompt, **beams), model.generate(prompt, use_cache=False, **beams))


# ---------------------------------------------------------------------------------------------------------------------
# Heads, saving, remote code, training


HEAD_INPUTS = {
    LunaForMaskedLM: lambda ids: dict(input_ids=ids, labels=ids),
    LunaForSequenceClassification: lambda ids: dict(input_ids=ids, labels=torch.tensor([0, 2])),
    LunaForTokenClassification: lambda ids: dict(input_ids=ids, labels=ids % 3),
    LunaForQuestionAnswering: lambda ids: dict(
        input_ids=ids, start_positions=torch.tensor([1, 2]), end_positions=torch.tensor([3, 4])
    ),
    LunaForMultipleChoice: lambda ids: dict(input_ids=ids[:, None].expand(2, 3, -1), labels=torch.tensor([0, 2])),
}


@pytest.mark.parametrize("head", list(HEAD_INPUTS), ids=lambda cls: cls.__name__)
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_every_head_trains_with_either_pooling(head, pooling):
    torch.manual_seed(0)
    model = head(kernel_config(num_labels=3, classifier_pooling=pooling, normalize_before=pooling == "mean"))
    outputs = model(**HEAD_INPUTS[head](random_ids(2, 7)))
    outputs.loss.backward()
    assert torch.isfinite(outputs.loss)
    assert all(p.grad is not None for name, p in model.named_parameters() if "feature_map" in name)


@pytest.mark.parametrize("attention_type", ["learned_kernel", "nested"])
def test_mean_pooling_averages_the_real_tokens(attention_type):
    torch.manual_seed(0)
    model = LunaModel(kernel_config(classifier_pooling="mean", attention_type=attention_type)).eval()
    ids = random_ids(2, 6)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    with torch.no_grad():
        outputs = model(ids, attention_mask=mask)
    torch.testing.assert_close(outputs.pooler_output[1], outputs.last_hidden_state[1, :4].mean(0))
    torch.testing.assert_close(outputs.pooler_output[0], outputs.last_hidden_state[0].mean(0))
    no_p = attention_type == "learned_kernel"
    assert (outputs.packed_hidden_state is None) == no_p and (outputs.packed_attention_mask is None) == no_p


def test_save_load_round_trip_and_remote_code_without_luna_hf(tmp_path):
    torch.manual_seed(0)
    encoder = LunaForMaskedLM(kernel_config(kernel_envelope="exp_sqnorm")).eval()
    decoder = causal_model(seed=1)
    encoder.save_pretrained(tmp_path / "encoder")
    decoder.save_pretrained(tmp_path / "decoder")
    for folder in ("encoder", "decoder"):  # every code file, whichever class was saved
        assert CODE_FILES <= {p.name for p in (tmp_path / folder).iterdir()}, folder
    config = json.loads((tmp_path / "encoder" / "config.json").read_text())
    assert config["attention_type"] == "learned_kernel"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_luna_causal.LunaForCausalLM"

    ids = random_ids(2, 9)
    reloaded = AutoModelForMaskedLM.from_pretrained(tmp_path / "encoder").eval()
    assert type(reloaded) is LunaForMaskedLM
    for name, tensor in encoder.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    assert type(AutoModel.from_pretrained(tmp_path / "encoder")) is LunaModel
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path / "decoder")) is LunaForCausalLM
    with torch.no_grad():
        expected_mlm = encoder(ids).logits
        expected_causal = decoder(ids).logits
    expected_generated = decoder.generate(ids[:, :4], max_new_tokens=4, do_sample=False)

    (tmp_path / "ids.json").write_text(json.dumps(ids.tolist()))
    remote = hub_fixture.run_python(
        "import json, torch\nfrom transformers import AutoModelForCausalLM, AutoModelForMaskedLM\n"
        f"folder = {str(tmp_path)!r}\n"
        "ids = torch.tensor(json.load(open(folder + '/ids.json')))\n"
        "mlm = AutoModelForMaskedLM.from_pretrained(folder + '/encoder', trust_remote_code=True).eval()\n"
        "lm = AutoModelForCausalLM.from_pretrained(folder + '/decoder', trust_remote_code=True).eval()\n"
        "with torch.no_grad():\n"
        "    out = {'mlm': mlm(ids).logits.tolist(), 'lm': lm(ids).logits.tolist(),\n"
        "           'generated': lm.generate(ids[:, :4], max_new_tokens=4, do_sample=False).tolist(),\n"
        "           'modules': [type(mlm).__module__, type(lm).__module__]}\n"
        "print(json.dumps(out))\n",
        hub_fixture.clean_env(tmp_path / "home", HF_HUB_OFFLINE=1),
        without_luna_hf=True,
    )
    assert all(module.startswith("transformers_modules.") for module in remote["modules"])
    torch.testing.assert_close(torch.tensor(remote["mlm"]), expected_mlm, atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.tensor(remote["lm"]), expected_causal, atol=1e-6, rtol=0)
    assert remote["generated"] == expected_generated.tolist()


def test_pipelines_run_on_saved_learned_kernel_models(tmp_path):
    from transformers import pipeline

    tokenizer = hub_fixture.build_tokenizer()
    kernel = dict(attention_type="learned_kernel", kernel_num_projections=4, kernel_num_channels=2)
    hub_fixture.save_tiny_model(LunaForMaskedLM, tmp_path / "mlm", tokenizer, **kernel)
    hub_fixture.save_tiny_model(LunaForSequenceClassification, tmp_path / "cls", tokenizer, num_labels=2, **kernel)
    hub_fixture.save_tiny_model(LunaForCausalLM, tmp_path / "lm", tokenizer, is_decoder=True, **kernel)
    filled = pipeline("fill-mask", model=str(tmp_path / "mlm"))(f"the movie was {tokenizer.mask_token}")
    assert len(filled) == 5 and all(0 <= row["score"] <= 1 for row in filled)
    features = pipeline("feature-extraction", model=str(tmp_path / "mlm"))("the movie was good")
    assert len(features[0]) == len(tokenizer("the movie was good").input_ids)
    label = pipeline("text-classification", model=str(tmp_path / "cls"))("a good film")[0]["label"]
    assert label in ("LABEL_0", "LABEL_1")
    generated = pipeline("text-generation", model=str(tmp_path / "lm"))("the movie", max_new_tokens=4, do_sample=False)
    assert generated[0]["generated_text"].startswith("the movie")


def test_torch_export_with_dynamic_batch_and_length_matches_eager():
    torch.manual_seed(0)
    model = LunaForSequenceClassification(kernel_config(num_labels=2)).eval()
    example = dict(input_ids=random_ids(2, 10), attention_mask=torch.tensor([[1] * 10, [1] * 7 + [0] * 3]))
    batch, length = torch.export.Dim("batch", min=1, max=16), torch.export.Dim("length", min=2, max=64)
    program = torch.export.export(model, (), example, dynamic_shapes={name: {0: batch, 1: length} for name in example})
    ids = random_ids(3, 17, seed=5)
    mask = torch.ones_like(ids)
    mask[2, 12:] = 0
    with torch.no_grad():
        torch.testing.assert_close(
            program.module()(input_ids=ids, attention_mask=mask).logits,
            model(ids, attention_mask=mask).logits,
            atol=1e-6,
            rtol=0,
        )


def test_a_tiny_model_learns_which_token_is_in_the_majority():
    """Sequence classification: which of two tokens fills most of 9 positions. A bag-of-tokens task that attention
    solves by averaging values; chance is 50%."""
    torch.manual_seed(0)
    model = LunaForSequenceClassification(kernel_config(num_labels=2, num_hidden_layers=1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)

    def batch(size):
        tokens = torch.randint(0, 2, (size, 9), generator=generator)
        labels = (tokens.sum(1) > 4).long()
        ids = torch.cat([torch.zeros(size, 1, dtype=torch.long), tokens + 5], dim=1)  # a <s> token first, pooled
        return ids, labels

    model.train()
    for _ in range(300):
        ids, labels = batch(32)
        loss = model(ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    ids, labels = batch(512)
    with torch.no_grad():
        accuracy = (model(ids).logits.argmax(-1) == labels).float().mean().item()
    assert accuracy > 0.9, accuracy


def test_lra_runner_trains_a_learned_kernel_model_under_its_own_run_name(tmp_path):
    pytest.importorskip("datasets", reason="the LRA runner reads its data with datasets (not in the version matrix)")
    from test_lra import train, write_easy_listops

    entry = train(tmp_path, "listops", write_easy_listops(tmp_path / "easy"), "--model", "learned-kernel",
                  "--max_steps", "60", "--eval_steps", "20")  # fmt: skip
    assert entry["model"] == "learned-kernel" and entry["test_accuracy"] >= 0.8, entry  # chance: 1/3
    assert json.loads((tmp_path / "run" / "config.json").read_text())["attention_type"] == "learned_kernel"
    assert CODE_FILES <= {p.name for p in (tmp_path / "run").iterdir()}
    card = (tmp_path / "run" / "README.md").read_text()
    assert "Linear Universal Neural Attention" in card and "slots packs" not in card


def test_a_tiny_causal_model_learns_to_continue_a_repetitive_text():
    pattern = torch.tensor([5, 9, 12, 7, 30, 22, 14, 3, 18, 25, 11])  # period 11
    text = pattern.repeat(20)
    model = causal_model(seed=3).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(150):
        starts = torch.randint(0, len(text) - 33, (8,), generator=generator)
        batch = torch.stack([text[s : s + 33] for s in starts.tolist()])
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1
    model.eval()
    prompt = text[4:14][None]  # 10 tokens, starting mid-period
    continuation = model.generate(prompt, max_new_tokens=25, do_sample=False, eos_token_id=None, pad_token_id=PAD)
    assert torch.equal(continuation[0, 10:], text[14:39])


# ---------------------------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    "field, value",
    [
        ("attention_type", "luna"),
        ("kernel_num_projections", 0),
        ("kernel_num_channels", -1),
        ("kernel_mlp_hidden", 0),
        ("kernel_shared_channels", "yes"),
        ("kernel_nonnegative", 1),
        ("kernel_envelope", "softplus_mlp"),
        ("kernel_eps", 0.0),
        ("kernel_eps", 1.5),
        ("causal_chunk_size", 0),
    ],
)
def test_bad_values_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        kernel_config(**{field: value})


@pytest.mark.parametrize("pooling", ["packed_mean", "packed_max", "packed_attention"])
def test_packed_poolings_are_refused_with_what_to_use_instead(pooling):
    with pytest.raises(ValueError, match=r'classifier_pooling.*"cls".*"mean"'):
        kernel_config(classifier_pooling=pooling)


@pytest.mark.parametrize("request_name", ["output_packed_hidden_states", "output_pack_attentions"])
def test_packed_outputs_are_refused(request_name):
    torch.manual_seed(0)
    model = LunaModel(kernel_config())
    with pytest.raises(ValueError, match=f"{request_name}.*output_hidden_states / output_attentions"):
        model(random_ids(1, 5), **{request_name: True})


def test_the_fixed_elu_feature_map_is_katharopoulos_linear_attention():
    """kernel_feature_map="elu_plus_one": A_ij = mu_j phi(q_i)^T phi(k_j) / sum_l ..., phi = elu + 1 per head
    dimension, written here from the layer's projections; no feature-map parameters."""
    attention = attention_module(LearnedKernelAttention, seed=4, kernel_feature_map="elu_plus_one")
    assert not list(attention.feature_map.parameters())
    hidden_states = torch.randn(2, 7, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    token_mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    q, k, v = reference_heads(attention, hidden_states)
    phi_q, phi_k = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
    kernel = (phi_q @ phi_k.mT) * token_mask[:, None, None, :]
    expected = attention.o_proj(((kernel / kernel.sum(-1, keepdim=True)) @ v).transpose(1, 2).flatten(2))
    with torch.no_grad():
        actual, _ = attention(hidden_states, token_mask)
    real = token_mask.bool()
    torch.testing.assert_close(actual[real], expected[real], rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="kernel_feature_map must be one of"):
        kernel_config(kernel_feature_map="relu")

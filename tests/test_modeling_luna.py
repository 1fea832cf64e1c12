"""Luna model behaviour: equality with an independent reference of the paper's equations, padding, dtypes,
attention backends, checkpointing, saving, remote code, heads and bad input."""

import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification

from luna_hf import (
    LunaConfig,
    LunaForMaskedLM,
    LunaForMultipleChoice,
    LunaForQuestionAnswering,
    LunaForSequenceClassification,
    LunaForTokenClassification,
    LunaModel,
)
from luna_hf.transformers_compat import enable_activation_checkpointing

VOCAB = 50
PAD = 1


def tiny_config(**overrides) -> LunaConfig:
    values = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=66,
        projected_length=6,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    values.update(overrides)
    return LunaConfig(**values)


def padded_batch(lengths, seq_len=None, seed=0):
    """Right-padded token ids (no pad id among real tokens) and their attention mask."""
    seq_len = seq_len or max(lengths)
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (len(lengths), seq_len), generator=generator)
    attention_mask = torch.zeros_like(input_ids)
    for row, length in enumerate(lengths):
        attention_mask[row, :length] = 1
        input_ids[row, length:] = PAD
    return input_ids, attention_mask


# ---------------------------------------------------------------------------------------------------------------
# Independent reference: paper Eqs. 1, 3-6 with the authors' choices (tied = one K/V projection, raw packed output
# without projection, post-LN, P cut to min(l, longest row) and sliced per row), one row and one head at a time,
# padding removed instead of masked. It reads only the state dict.
# ---------------------------------------------------------------------------------------------------------------
def reference_forward(state, config, input_ids, lengths):
    C, H = config.hidden_size, config.num_attention_heads
    d = C // H
    eps = config.layer_norm_eps

    def linear(x, name):
        return x @ state[f"{name}.weight"].T + state[f"{name}.bias"]

    def layer_norm(x, name):
        return F.layer_norm(x, (C,), state[f"{name}.weight"], state[f"{name}.bias"], eps)

    def attention(queries, context, prefix, has_output):
        keys = linear(context, f"{prefix}.kv_proj" if config.tie_key_value else f"{prefix}.k_proj")
        values = keys if config.tie_key_value else linear(context, f"{prefix}.v_proj")
        q = linear(queries, f"{prefix}.q_proj")
        heads = []
        for h in range(H):
            cols = slice(h * d, (h + 1) * d)
            scores = q[:, cols] @ keys[:, cols].T / math.sqrt(d)
            heads.append(torch.softmax(scores, dim=-1) @ values[:, cols])
        out = torch.cat(heads, dim=-1)
        return linear(out, f"{prefix}.o_proj") if has_output else out

    longest = max(lengths)
    batch_slots = min(config.projected_length, longest) if config.dynamic_projection else config.projected_length
    results = []
    for row, n in enumerate(lengths):
        tokens = input_ids[row, :n]
        positions = torch.arange(n) + PAD + 1
        x = (
            state["luna.embeddings.word_embeddings.weight"][tokens]
            + state["luna.embeddings.position_embeddings.weight"][positions]
        )
        x = layer_norm(x, "luna.embeddings.layer_norm")
        slots = min(batch_slots, n) if config.dynamic_projection else batch_slots
        p = layer_norm(
            state["luna.embeddings.projected_embeddings"][:batch_slots], "luna.embeddings.projected_layer_norm"
        )
        for i in range(config.num_hidden_layers):
            prefix = f"luna.layers.{i}"
            if config.normalize_before:  # the authors' pre-LN layer: sub-layers read normalised X and P
                x_in = layer_norm(x, f"{prefix}.attention_layer_norm")
                p_in = layer_norm(p, f"{prefix}.packed_layer_norm")
                y_p = attention(p_in, x_in, f"{prefix}.pack_attention", has_output=False)
                y_x = attention(x_in, y_p[:slots], f"{prefix}.unpack_attention", has_output=True)
                p, x = p + y_p, x + y_x
                ffn_in = layer_norm(x, f"{prefix}.ffn_layer_norm")
                x = x + linear(F.gelu(linear(ffn_in, f"{prefix}.fc1")), f"{prefix}.fc2")
                continue
            y_p = attention(p, x, f"{prefix}.pack_attention", has_output=False)  # Eq. 3: P attends to X
            y_x = attention(x, y_p[:slots], f"{prefix}.unpack_attention", has_output=True)  # Eq. 4: X attends to Y_P
            p = layer_norm(p + y_p, f"{prefix}.packed_layer_norm")  # Eq. 6
            x = layer_norm(x + y_x, f"{prefix}.attention_layer_norm")
            ffn = linear(F.gelu(linear(x, f"{prefix}.fc1")), f"{prefix}.fc2")
            x = layer_norm(x + ffn, f"{prefix}.ffn_layer_norm")
        if config.normalize_before:  # and the final LayerNorms after the last layer
            x, p = layer_norm(x, "luna.layer_norm"), layer_norm(p, "luna.packed_layer_norm")
        logits = layer_norm(F.gelu(linear(x, "lm_head.dense")), "lm_head.layer_norm")
        logits = logits @ state["luna.embeddings.word_embeddings.weight"].T + state["lm_head.decoder.bias"]
        results.append((x, p[:slots], logits))
    return results


def perturbed_masked_lm(config, attn_implementation):
    """A masked LM with non-trivial LayerNorm and bias values, so a swapped or missing term shows."""
    config._attn_implementation = attn_implementation
    model = LunaForMaskedLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "layer_norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model


@pytest.mark.parametrize("tie_key_value", [True, False])
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_pre_layer_norm_matches_independent_reference(tie_key_value, attn_implementation):
    """`normalize_before=True`: the authors' pre-LN layers and final LayerNorms, padded batch, P cut and masked."""
    torch.manual_seed(0)
    config = tiny_config(tie_key_value=tie_key_value, projected_length=4, normalize_before=True)
    model = perturbed_masked_lm(config, attn_implementation)
    lengths = [9, 3, 6, 1]
    input_ids, attention_mask = padded_batch(lengths)
    with torch.no_grad():
        outputs = model(input_ids, attention_mask=attention_mask)
        base = model.luna(input_ids, attention_mask=attention_mask)
        post_ln = LunaForMaskedLM(tiny_config(tie_key_value=tie_key_value, projected_length=4)).eval()
        post_ln.load_state_dict(model.state_dict(), strict=False)
        other = post_ln.luna(input_ids, attention_mask=attention_mask).last_hidden_state
    expected = reference_forward(model.state_dict(), config, input_ids, lengths)
    for row, (x, p, logits) in enumerate(expected):
        n = lengths[row]
        torch.testing.assert_close(base.last_hidden_state[row, :n], x, atol=1e-5, rtol=0)
        torch.testing.assert_close(base.packed_hidden_state[row, : p.shape[0]], p, atol=1e-5, rtol=0)
        torch.testing.assert_close(outputs.logits[row, :n], logits, atol=1e-5, rtol=0)
    assert (other - base.last_hidden_state).abs().max() > 0.1  # the same weights, another computation


def test_pre_layer_norm_adds_only_the_final_layer_norms():
    """The default (post-LN) model keeps the authors' parameters; pre-LN adds the two final LayerNorms only."""
    post, pre = LunaModel(tiny_config()), LunaModel(tiny_config(normalize_before=True))
    extra = set(pre.state_dict()) - set(post.state_dict())
    assert extra == {"layer_norm.weight", "layer_norm.bias", "packed_layer_norm.weight", "packed_layer_norm.bias"}
    assert set(post.state_dict()) <= set(pre.state_dict())


@pytest.mark.parametrize("tie_key_value", [True, False])
@pytest.mark.parametrize("projected_length", [1, 4, 16])
@pytest.mark.parametrize("dynamic_projection", [True, False])
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_matches_independent_reference(tie_key_value, projected_length, dynamic_projection, attn_implementation):
    torch.manual_seed(0)
    config = tiny_config(
        tie_key_value=tie_key_value, projected_length=projected_length, dynamic_projection=dynamic_projection
    )
    model = perturbed_masked_lm(config, attn_implementation)
    lengths = [9, 3, 6, 1]
    input_ids, attention_mask = padded_batch(lengths)
    with torch.no_grad():
        outputs = model(input_ids, attention_mask=attention_mask, output_hidden_states=True)
        base = model.luna(input_ids, attention_mask=attention_mask)
    expected = reference_forward(model.state_dict(), config, input_ids, lengths)
    for row, (x, p, logits) in enumerate(expected):
        n = lengths[row]
        torch.testing.assert_close(base.last_hidden_state[row, :n], x, atol=1e-5, rtol=0)
        torch.testing.assert_close(base.packed_hidden_state[row, : p.shape[0]], p, atol=1e-5, rtol=0)
        torch.testing.assert_close(outputs.logits[row, :n], logits, atol=1e-5, rtol=0)


def test_parameter_count_matches_the_authors_models():
    # The authors' luna.base.tied / luna.base.untied (RoBERTa vocabulary): 131.90M / 146.08M parameters.
    counts = {}
    for tie in (True, False):
        with torch.device("meta"):
            model = LunaForMaskedLM(LunaConfig(tie_key_value=tie))
        counts[tie] = sum(p.numel() for p in model.parameters())
    assert round(counts[True] / 1e6, 2) == 131.90
    assert round(counts[False] / 1e6, 2) == 146.08


def pad_rows(rows, seq_len, side, fill, embeddings, seed=0):
    """Rows padded on one side to seq_len, with the attention mask; `fill` is what the padded positions hold: the
    config's pad id, id 0 (what BERT tokenizers pad with), random ids, or (as inputs_embeds) random vectors."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (len(rows), seq_len), generator=generator)
    if fill in ("config pad id", "id 0"):
        ids.fill_(PAD if fill == "config pad id" else 0)
    mask = torch.zeros_like(ids)
    for row, tokens in enumerate(rows):
        columns = slice(0, len(tokens)) if side == "right" else slice(seq_len - len(tokens), seq_len)
        ids[row, columns], mask[row, columns] = tokens, 1
    if fill != "random embeddings":
        return dict(input_ids=ids, attention_mask=mask), mask
    inputs_embeds = embeddings(ids)
    noise = torch.randn(inputs_embeds.shape, generator=generator) * 3
    return dict(inputs_embeds=torch.where(mask.bool()[..., None], inputs_embeds, noise), attention_mask=mask), mask


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("classifier_pooling", ["cls", "packed_mean", "packed_max", "packed_attention"])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("fill", ["config pad id", "id 0", "random ids", "random embeddings"])
def test_outputs_depend_only_on_the_real_tokens_and_the_mask(attn_implementation, classifier_pooling, side, fill):
    """Every output of a padded row equals the row alone, whatever the padding side and whatever fills it: positions,
    pack and pooling all read the attention mask."""
    torch.manual_seed(0)
    config = tiny_config(classifier_pooling=classifier_pooling, num_labels=3)
    config._attn_implementation = attn_implementation
    model = LunaForSequenceClassification(config).eval()
    rows = [torch.randint(3, VOCAB, (n,)) for n in (12, 4, 9)]
    inputs, mask = pad_rows(rows, 16, side, fill, model.luna.embeddings.word_embeddings)
    with torch.no_grad():
        batched = model.luna(**inputs)
        logits = model(**inputs).logits
        for row, tokens in enumerate(rows):
            alone = model.luna(tokens[None])
            torch.testing.assert_close(
                batched.last_hidden_state[row][mask[row].bool()], alone.last_hidden_state[0], atol=1e-5, rtol=0
            )
            slots, packed_length = alone.packed_hidden_state.shape[1], batched.packed_hidden_state.shape[1]
            assert batched.packed_attention_mask[row].tolist() == [1] * slots + [0] * (packed_length - slots)
            torch.testing.assert_close(
                batched.packed_hidden_state[row, :slots], alone.packed_hidden_state[0], atol=1e-5, rtol=0
            )
            torch.testing.assert_close(batched.pooler_output[row], alone.pooler_output[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(logits[row], model(tokens[None]).logits[0], atol=1e-5, rtol=0)


def test_dynamic_projection_cuts_and_masks_p():
    model = LunaModel(tiny_config(projected_length=8, attn_implementation="eager")).eval()
    input_ids, attention_mask = padded_batch([5, 3])
    with torch.no_grad():
        outputs = model(input_ids, attention_mask=attention_mask, output_attentions=True)
    assert outputs.packed_hidden_state.shape[1] == 5  # min(l=8, longest row=5)
    unpack = outputs.attentions[0]  # (batch, heads, tokens, slots)
    assert unpack.shape == (2, 4, 5, 5)
    assert torch.all(unpack[1, :, :3, 3:] == 0)  # row of 3 tokens uses 3 slots
    assert torch.allclose(unpack.sum(-1), torch.ones(()))
    pack = outputs.pack_attentions[0]  # (batch, heads, slots, tokens)
    assert pack.shape == (2, 4, 5, 5)
    assert torch.all(pack[1, :, :, 3:] == 0)  # padding is never packed
    fixed = LunaModel(tiny_config(projected_length=8, dynamic_projection=False)).eval()
    assert fixed(input_ids, attention_mask=attention_mask).packed_hidden_state.shape[1] == 8


def test_each_layer_returns_its_own_pack_and_unpack_maps():
    """Recorded per layer, in order, each under its own key (transformers 5.9 matched "pack_attention" inside
    "unpack_attention" and returned both maps as pack maps): compared with the maps the modules themselves return."""
    model = LunaModel(tiny_config(num_hidden_layers=3, projected_length=3, attn_implementation="eager")).eval()
    returned = {"pack": [], "unpack": []}
    for layer in model.layers:
        for kind in returned:
            module = getattr(layer, f"{kind}_attention")
            module.register_forward_hook(lambda module, args, output, kind=kind: returned[kind].append(output[1]))
    with torch.no_grad():
        outputs = model(*padded_batch([7, 4]), output_attentions=True)
    expected = [(outputs.pack_attentions, "pack", (2, 4, 3, 7)), (outputs.attentions, "unpack", (2, 4, 7, 3))]
    for recorded, kind, shape in expected:
        assert len(recorded) == 3 and all(tuple(map_.shape) == shape for map_ in recorded), kind
        assert all(torch.equal(a, b) for a, b in zip(recorded, returned[kind], strict=True)), kind


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_no_nan_at_the_edges(attn_implementation):
    torch.manual_seed(0)
    config = tiny_config()
    config._attn_implementation = attn_implementation
    model = LunaForMaskedLM(config).eval()
    input_ids, attention_mask = padded_batch([5, 2])
    attention_mask[1] = 0  # a fully padded row
    cases = {
        "length 1": (input_ids[:, :1], None),
        "maximum length": (torch.randint(3, VOCAB, (2, config.max_sequence_length)), None),
        "fully padded row": (input_ids, attention_mask),
    }
    with torch.no_grad():
        for name, (ids, mask) in cases.items():
            assert torch.isfinite(model(ids, attention_mask=mask).logits).all(), name
        bf16 = model.to(torch.bfloat16)
        assert torch.isfinite(bf16(input_ids, attention_mask=attention_mask).logits.float()).all(), "bf16"


@pytest.mark.parametrize("classifier_pooling", ["packed_max", "packed_attention"])
def test_learned_packed_pooling_of_a_fully_padded_row_is_finite(classifier_pooling):
    model = LunaForSequenceClassification(tiny_config(classifier_pooling=classifier_pooling)).eval()
    assert model.classifier.pooler is not None and not any("pooler" in name for name, _ in model.luna.named_modules())
    assert LunaForSequenceClassification(tiny_config()).classifier.pooler is None
    input_ids, attention_mask = padded_batch([5, 2])
    attention_mask[1] = 0
    with torch.no_grad():
        assert torch.isfinite(model(input_ids, attention_mask=attention_mask).logits).all()


def test_eager_matches_sdpa_with_dropout_off():
    torch.manual_seed(0)
    eager = LunaForMaskedLM(tiny_config(attn_implementation="eager")).eval()
    sdpa = LunaForMaskedLM(tiny_config(attn_implementation="sdpa")).eval()
    sdpa.load_state_dict(eager.state_dict())
    input_ids, attention_mask = padded_batch([7, 2, 5])
    with torch.no_grad():
        expected = eager(input_ids, attention_mask=attention_mask).logits
        actual = sdpa(input_ids, attention_mask=attention_mask).logits
    real = attention_mask.bool()
    torch.testing.assert_close(actual[real], expected[real], atol=1e-5, rtol=0)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = LunaForMaskedLM(tiny_config())
    input_ids, attention_mask = padded_batch([8, 5])
    labels = input_ids.masked_fill(attention_mask == 0, -100)

    def gradients():
        model.zero_grad()
        model(input_ids, attention_mask=attention_mask, labels=labels).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    model.train()
    plain = gradients()
    enable_activation_checkpointing(model)
    assert model.luna.layers[0].gradient_checkpointing
    checkpointed = gradients()
    assert plain.keys() == checkpointed.keys() and len(plain) > 20
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16])
def test_training_feed_forward_keeps_one_wide_tensor_and_the_plain_gradients(autocast_dtype):
    """In training the FFN keeps fc1's output only and recomputes the activation in the backward pass; values and
    gradients are those of fc2(gelu(fc1(x))) computed with plain ops here."""
    torch.manual_seed(0)
    layer = LunaModel(tiny_config()).layers[0].train()
    hidden = torch.randn(3, 7, 32, requires_grad=True)
    weights = [layer.fc1.weight, layer.fc1.bias, layer.fc2.weight, layer.fc2.bias]
    autocast = torch.autocast("cpu", dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None)
    saved = []
    with autocast, torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        output = layer.feed_forward(hidden)
    with autocast:
        plain = F.linear(F.gelu(F.linear(hidden, *weights[:2])), *weights[2:])
    assert sum(t.numel() == 3 * 7 * 48 for t in saved) == 1  # n x intermediate_size: fc1's output, not gelu's too
    assert output.dtype == plain.dtype
    gradients = torch.autograd.grad(output.float().square().sum(), [hidden, *weights])
    expected = torch.autograd.grad(plain.float().square().sum(), [hidden, *weights])
    tolerance = dict(atol=1e-6, rtol=1e-5) if autocast_dtype is None else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(output, plain, **tolerance)
    for got, want in zip(gradients, expected, strict=True):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, **tolerance)


def test_residual_dropout_keeps_a_one_byte_mask_and_scales_as_nn_dropout():
    from luna_hf.modeling_luna import LunaDropout

    torch.manual_seed(0)
    dropout = LunaDropout(0.25).train()
    inputs = torch.ones(200, 300, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        dropped = dropout(inputs)
    assert [t.dtype for t in saved] == [torch.bool]
    assert dropped.unique().tolist() == [0.0, pytest.approx(1 / 0.75)]
    assert (dropped == 0).float().mean().item() == pytest.approx(0.25, abs=0.01)
    dropped.sum().backward()
    assert torch.equal(inputs.grad, dropped.detach())
    assert dropout.eval()(inputs) is inputs


def test_save_load_round_trip_is_exact_and_folder_carries_remote_code(tmp_path):
    torch.manual_seed(0)
    model = LunaForMaskedLM(tiny_config()).eval()
    model.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    code = {"configuration_luna.py", "modeling_luna.py", "modeling_luna_attention.py", "modeling_luna_causal.py"}
    assert {"config.json", "model.safetensors", *code} <= files
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    for auto_class in (
        "AutoConfig",
        "AutoModel",
        "AutoModelForMaskedLM",
        "AutoModelForSequenceClassification",
        "AutoModelForTokenClassification",
        "AutoModelForMultipleChoice",
        "AutoModelForQuestionAnswering",
    ):
        assert auto_class in auto_map, auto_class
    reloaded = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is LunaForMaskedLM
    assert reloaded.lm_head.decoder.weight is reloaded.luna.embeddings.word_embeddings.weight
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    base = AutoModel.from_pretrained(tmp_path)
    assert type(base) is LunaModel
    assert type(AutoConfig.from_pretrained(tmp_path)) is LunaConfig


REMOTE_CODE_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class RefuseLunaHf(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "luna_hf" or name.startswith("luna_hf."):
                raise ImportError("luna_hf is deliberately unavailable in this process")

    sys.meta_path.insert(0, RefuseLunaHf())
    try:
        import luna_hf  # noqa: F401
        raise SystemExit("luna_hf should not be importable here")
    except ImportError:
        pass

    import torch
    from transformers import AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification

    folder, ids_path = sys.argv[1], sys.argv[2]
    input_ids = torch.tensor(json.load(open(ids_path)))
    mlm = AutoModelForMaskedLM.from_pretrained(folder, trust_remote_code=True).eval()
    base = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    classifier = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)
    assert type(mlm).__module__.startswith("transformers_modules"), type(mlm).__module__
    with torch.no_grad():
        print(json.dumps({
            "logits": mlm(input_ids).logits.tolist(),
            "hidden": base(input_ids).last_hidden_state.tolist(),
            "classifier": type(classifier).__name__,
        }))
    """
)


def test_remote_code_loads_where_luna_hf_is_not_installed(tmp_path):
    torch.manual_seed(0)
    model = LunaForMaskedLM(tiny_config()).eval()
    folder = tmp_path / "luna-mlm"
    model.save_pretrained(folder)
    input_ids, _ = padded_batch([6, 6])
    (tmp_path / "ids.json").write_text(json.dumps(input_ids.tolist()))
    (tmp_path / "check.py").write_text(REMOTE_CODE_SCRIPT)
    result = subprocess.run(
        [sys.executable, str(tmp_path / "check.py"), str(folder), str(tmp_path / "ids.json")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"HF_HOME": str(tmp_path / "hf"), "PATH": "/usr/bin:/bin"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    remote = json.loads(result.stdout.strip().splitlines()[-1])
    with torch.no_grad():
        torch.testing.assert_close(torch.tensor(remote["logits"]), model(input_ids).logits, atol=1e-6, rtol=0)
        torch.testing.assert_close(
            torch.tensor(remote["hidden"]), model.luna(input_ids).last_hidden_state, atol=1e-6, rtol=0
        )
    assert remote["classifier"] == "LunaForSequenceClassification"


def head_batches():
    input_ids, attention_mask = padded_batch([10, 7, 10, 4], seed=1)
    generator = torch.Generator().manual_seed(2)
    return (
        {
            LunaForMaskedLM: dict(labels=input_ids.masked_fill(attention_mask == 0, -100)),
            LunaForSequenceClassification: dict(labels=torch.tensor([0, 1, 2, 1])),
            LunaForTokenClassification: dict(labels=torch.randint(0, 3, input_ids.shape, generator=generator)),
            LunaForQuestionAnswering: dict(
                start_positions=torch.tensor([1, 2, 3, 0]), end_positions=torch.tensor([4, 5, 6, 2])
            ),
            # 2 questions x 2 choices
            LunaForMultipleChoice: dict(
                labels=torch.tensor([0, 1]),
                input_ids=input_ids.view(2, 2, -1),
                attention_mask=attention_mask.view(2, 2, -1),
            ),
        },
        input_ids,
        attention_mask,
    )


@pytest.mark.parametrize(
    "head, problem_type",
    [
        (LunaForMaskedLM, None),
        (LunaForSequenceClassification, "single_label_classification"),
        (LunaForSequenceClassification, "multi_label_classification"),
        (LunaForSequenceClassification, "regression"),
        (LunaForTokenClassification, None),
        (LunaForQuestionAnswering, None),
        (LunaForMultipleChoice, None),
    ],
)
def test_every_head_learns_a_tiny_batch(head, problem_type):
    torch.manual_seed(0)
    labels_by_head, input_ids, attention_mask = head_batches()
    inputs = dict(dict(input_ids=input_ids, attention_mask=attention_mask), **labels_by_head[head])
    num_labels = 1 if problem_type == "regression" else 3
    if problem_type == "multi_label_classification":
        inputs["labels"] = F.one_hot(inputs["labels"], 3).float()
    elif problem_type == "regression":
        inputs["labels"] = inputs["labels"].float()
    model = head(tiny_config(num_labels=num_labels, problem_type=problem_type)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = model(**inputs).loss
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(projected_length=0), "projected_length"),
        (dict(hidden_size=30, num_attention_heads=4), "hidden_size"),
        (dict(classifier_pooling="max"), "classifier_pooling"),
        (dict(hidden_act="swishy"), "hidden_act"),
        (dict(hidden_dropout_prob=1.5), "hidden_dropout_prob"),
        (dict(max_position_embeddings=2), "max_position_embeddings"),
        (dict(num_hidden_layers=-1), "num_hidden_layers"),
        (dict(normalize_before="yes"), "normalize_before"),
        (dict(normalize_before=True, is_decoder=True), "normalize_before"),
    ],
)
def test_bad_config_values_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


def test_bad_inputs_raise_clear_errors():
    model = LunaModel(tiny_config()).eval()
    too_long = torch.randint(3, VOCAB, (1, model.config.max_sequence_length + 1))
    with pytest.raises(ValueError, match="exceeds this model's maximum of 64 tokens"):
        model(too_long)
    with pytest.raises(ValueError, match="non-empty batch"):
        model(torch.zeros(0, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="integer token ids"):
        model(torch.rand(2, 5))
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model()
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(torch.randint(3, VOCAB, (2, 5)), attention_mask=torch.ones(2, 4))


def test_resize_token_embeddings_keeps_the_tie():
    model = LunaForMaskedLM(tiny_config())
    model.resize_token_embeddings(VOCAB + 7)
    assert model.config.vocab_size == VOCAB + 7
    assert model.lm_head.decoder.weight is model.luna.embeddings.word_embeddings.weight
    assert model(torch.tensor([[VOCAB + 6, 4, 5]])).logits.shape == (1, 3, VOCAB + 7)


def test_a_folder_saved_before_the_lm_bias_and_pooler_moved_is_refused_with_the_fix(tmp_path):
    """Never silently re-initialised: the old names stop the load with the rename, which then loads the same model."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    model = LunaForSequenceClassification(tiny_config(classifier_pooling="packed_attention", num_labels=2)).eval()
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    old = {key.replace("classifier.pooler.", "luna.pooler.", 1): value for key, value in state.items()}
    assert old != state
    save_file(old, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"before December 2026.*luna\.pooler\..*Rename them once") as refusal:
        AutoModelForSequenceClassification.from_pretrained(tmp_path)
    fix = str(refusal.value).split("then load again:\n")[1].split("\n(docs")[0]
    exec(textwrap.dedent(fix))  # the printed fix, as a user would paste it
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    input_ids, attention_mask = padded_batch([5, 3])
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids, attention_mask=attention_mask).logits,
                           model(input_ids, attention_mask=attention_mask).logits)  # fmt: skip


def test_padded_ids_without_an_attention_mask_get_transformers_warning(monkeypatch):
    """As RoBERTa: transformers' own check (pad id at either end) runs when no mask is given, and only then."""
    import transformers

    model = LunaModel(tiny_config()).eval()
    input_ids, attention_mask = padded_batch([5, 3])
    warnings = []
    monkeypatch.setattr(transformers.modeling_utils.logger, "warning_once", warnings.append)
    with torch.no_grad():
        model(input_ids, attention_mask=attention_mask)
        assert warnings == []
        model(input_ids)
    assert len(warnings) == 1 and "attention_mask" in warnings[0]


@pytest.mark.parametrize("attention_type", ["nested", "learned_kernel"])
def test_return_dict_false_puts_the_pooled_output_second_and_the_attentions_last(attention_type):
    """BERT-style callers unpack `sequence, pooled = model(..., return_dict=False)[:2]` and read `[-1]` as the
    attentions; the tuple must hold the dict's tensors in that order for either attention (None entries dropped)."""
    overrides = {"attention_type": attention_type} if attention_type == "learned_kernel" else {}
    model = LunaModel._from_config(tiny_config(**overrides), attn_implementation="eager").eval()
    input_ids, attention_mask = padded_batch([7, 4])
    flags = dict(output_hidden_states=True, output_attentions=True)
    with torch.no_grad():
        as_dict = model(input_ids, attention_mask=attention_mask, **flags)
        as_tuple = model(input_ids, attention_mask=attention_mask, return_dict=False, **flags)
    expected = [as_dict.last_hidden_state, as_dict.pooler_output]
    if attention_type == "nested":
        expected += [as_dict.packed_hidden_state, as_dict.packed_attention_mask, as_dict.pack_attentions]
    expected += [as_dict.hidden_states, as_dict.attentions]
    assert all(len(maps) == 2 for maps in expected[-1:])
    assert len(as_tuple) == len(expected)
    for got, want in zip(as_tuple, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert as_tuple[1].shape == (2, model.config.hidden_size)
    assert as_tuple[-1][0].shape[-2] == input_ids.shape[1]  # a map per query token: the (unpack) attentions

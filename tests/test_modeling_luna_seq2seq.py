"""Luna's encoder-decoder translation model (`LunaForConditionalGeneration`): parity with the authors' `luna` model
(tests/fairseq_mt_reference.py, plain PyTorch from their parameter names), cached decoding, beam search, padding,
the constant-size cache, saving and remote code, a copy task, and the errors."""

import argparse
import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM, Seq2SeqTrainer, Seq2SeqTrainingArguments
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

sys.path.insert(0, str(Path(__file__).parent))
import hub_fixture  # noqa: E402
from fairseq_mt_reference import FairseqLunaMT, fairseq_sinusoidal_table  # noqa: E402

from luna_hf import LunaForConditionalGeneration, LunaSeq2SeqConfig, LunaSeq2SeqModel  # noqa: E402
from luna_hf.modeling_luna_seq2seq import (  # noqa: E402
    LunaSeq2SeqEncoderOutput,
    pack_attention_mask,
    unpack_attention_mask,
)
from luna_hf.transformers_compat import CACHE_OUTPUT_NAME as CACHE  # noqa: E402 (the release's output name)

PAD, EOS, VOCAB = 1, 2, 40
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "convert_fairseq_luna_to_hf.py"


def tiny_config(**kwargs) -> LunaSeq2SeqConfig:
    defaults = dict(
        vocab_size=VOCAB,
        hidden_size=16,
        encoder_layers=2,
        decoder_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        projected_length=4,
        max_position_embeddings=40,
        hidden_dropout_prob=0.0,
    )
    return LunaSeq2SeqConfig(**{**defaults, **kwargs})


def tiny_model(seed=0, **kwargs) -> LunaForConditionalGeneration:
    torch.manual_seed(seed)
    model = LunaForConditionalGeneration(tiny_config(**kwargs)).eval()
    with torch.no_grad():  # biases and LayerNorms away from their initial 0 / 1, so that a misplaced one shows
        for name, parameter in model.named_parameters():
            if name.endswith("bias") or "layer_norm" in name:
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model


# HF name pieces -> the authors' (fairseq) names, applied in order.
FAIRSEQ_NAMES = [
    (r"^lm_head\.", "decoder.output_projection."),
    (r"^model\.", ""),
    (r"embed_positions\.embeddings\.", "embed_positions."),
    (r"^encoder\.packed_layer_norm\.", "encoder.proj_layer_norm."),
    (r"(encoder\.layers\.\d+)\.pack_attention\.", r"\1.self_attn.pack_"),
    (r"(encoder\.layers\.\d+)\.unpack_attention\.", r"\1.self_attn."),
    (r"cross_attention\.pack_attention\.", "encoder_attn.pack_"),
    (r"cross_attention\.unpack_attention\.", "encoder_attn."),
    (r"self_attention\.pack_query_proj", "self_attn.pq_proj"),
    (r"self_attention\.pack_key_proj", "self_attn.pc_proj"),
    (r"self_attention\.", "self_attn."),
    (r"pack_q_proj", "pq_proj"),
    (r"pack_kv_proj", "pc_proj"),
    (r"pack_k_proj", "pk_proj"),
    (r"pack_v_proj", "pv_proj"),
    (r"\.kv_proj", ".c_proj"),
    (r"\.o_proj", ".out_proj"),
    (r"(encoder\.layers\.\d+)\.attention_layer_norm", r"\1.self_attn_layer_norm"),
    (r"(encoder\.layers\.\d+)\.packed_layer_norm", r"\1.self_atten_proj_layer_norm"),
    (r"self_attention_layer_norm", "self_attn_layer_norm"),
    (r"cross_attention_packed_layer_norm", "encoder_atten_proj_layer_norm"),
    (r"cross_attention_layer_norm", "encoder_attn_layer_norm"),
    (r"ffn_layer_norm", "final_layer_norm"),
]


def fairseq_state(model) -> dict:
    state = {}
    for name, tensor in model.state_dict().items():
        for pattern, replacement in FAIRSEQ_NAMES:
            name = re.sub(pattern, replacement, name)
        state[name] = tensor.detach().clone()
    return state


def reference(model) -> FairseqLunaMT:
    config = model.config
    return FairseqLunaMT(
        fairseq_state(model),
        config.num_attention_heads,
        normalize_before=config.normalize_before,
        dynamic_projection=config.dynamic_projection,
        scale_embedding=config.scale_embedding,
    )


def left_padded_source():
    """Two sources of lengths 7 and 3, left-padded as fairseq pads them."""
    generator = torch.Generator().manual_seed(1)
    source = torch.randint(3, VOCAB, (2, 7), generator=generator)
    source[1, :4] = PAD
    return source, source.ne(PAD).long()


def target(batch=2, length=5, seed=2):
    ids = torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = EOS  # fairseq starts the target with </s>
    return ids


VARIANTS = {
    "post_ln_tied_sinusoidal": {},
    "pre_ln_untied_learned": dict(normalize_before=True, tie_key_value=False, position_embedding_type="learned"),
    "fixed_projection_unscaled": dict(dynamic_projection=False, scale_embedding=False, projected_length=3),
    "unshared_embeddings": dict(tie_word_embeddings=False),  # separate source, target and output matrices
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_the_authors_model_layer_by_layer_and_whole(variant):
    model = tiny_model(**VARIANTS[variant])
    ref = reference(model)
    source, source_mask = left_padded_source()
    decoder_ids = target()
    with torch.no_grad():
        encoded = model.model.encoder(source, source_mask)
        ref_out, ref_p, ref_token_mask, ref_slot_mask = ref.encode(source)
        real = source_mask.bool()
        torch.testing.assert_close(encoded.last_hidden_state[real], ref_out.transpose(0, 1)[real], atol=1e-5, rtol=0)
        torch.testing.assert_close(encoded.packed_hidden_state, ref_p.transpose(0, 1), atol=1e-5, rtol=0)

        # One decoder layer on the same inputs.
        hidden = torch.randn(2, 5, 16)
        token_mask, token_count = torch.ones(2, 5, dtype=torch.long), torch.arange(1, 6).expand(2, -1)
        decoder = model.model.decoder
        slot_mask = encoded.packed_attention_mask
        masks = (
            pack_attention_mask(model.config, encoded.packed_hidden_state, encoded.last_hidden_state, source_mask),
            unpack_attention_mask(model.config, hidden, encoded.packed_hidden_state, slot_mask),
        )
        x, p = decoder.layers[0](
            hidden, encoded.packed_hidden_state, encoded.last_hidden_state, (*masks, slot_mask), token_mask, token_count
        )
        ref_x, ref_px = ref.decoder_layer(0, hidden.transpose(0, 1), ref_p, (ref_out, ref_token_mask, ref_slot_mask))
        torch.testing.assert_close(x, ref_x.transpose(0, 1), atol=1e-5, rtol=0)
        torch.testing.assert_close(p, ref_px.transpose(0, 1), atol=1e-5, rtol=0)

        logits = model(input_ids=source, attention_mask=source_mask, decoder_input_ids=decoder_ids).logits
    torch.testing.assert_close(logits, ref.forward(source, decoder_ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", ["post_ln_tied_sinusoidal", "pre_ln_untied_learned"])
def test_cached_decoding_equals_the_full_forward_and_the_authors_incremental_decoding(variant):
    model = tiny_model(**VARIANTS[variant])
    source, source_mask = left_padded_source()
    decoder_ids = target(length=6)
    with torch.no_grad():
        full = model(input_ids=source, attention_mask=source_mask, decoder_input_ids=decoder_ids).logits
        encoder_outputs = model.get_encoder()(source, source_mask)
        # After the first call the source is not read again: hand the later steps NaN for the encoder's states.
        unread = LunaSeq2SeqEncoderOutput(
            last_hidden_state=torch.full_like(encoder_outputs.last_hidden_state, float("nan")),
            packed_hidden_state=torch.full_like(encoder_outputs.packed_hidden_state, float("nan")),
            packed_attention_mask=encoder_outputs.packed_attention_mask,
        )
        cache, steps = None, []
        for start, stop in [(0, 2), (2, 3), (3, 4), (4, 5), (5, 6)]:  # a 2-token prefill, then one token per step
            out = model(
                attention_mask=source_mask,
                encoder_outputs=encoder_outputs if start == 0 else unread,
                decoder_input_ids=decoder_ids[:, start:stop],
                cache=cache,
                use_cache=True,
            )
            cache = getattr(out, CACHE)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)
    assert isinstance(cache, EncoderDecoderCache) and cache.get_seq_length() == 6
    authors_incremental = reference(model).decode_incrementally(source, decoder_ids)
    torch.testing.assert_close(authors_incremental, full, atol=1e-5, rtol=0)


def test_generation_with_and_without_cache_gives_the_same_sequences():
    model = tiny_model(seed=3)
    source, source_mask = left_padded_source()
    for options in (dict(do_sample=False), dict(num_beams=3, num_return_sequences=2), dict(do_sample=True, top_k=5)):
        runs = []
        for use_cache in (True, False):
            torch.manual_seed(0)
            runs.append(model.generate(source, attention_mask=source_mask, max_new_tokens=8, use_cache=use_cache,
                                       min_new_tokens=8, **options))  # fmt: skip
        assert runs[0].shape[1] == 9 and torch.equal(runs[0], runs[1]), options


def test_beam_search_needs_the_cache_reordered(monkeypatch):
    """The control for the test above: with `reorder_cache` disabled the cached beams read other beams' states."""
    model = tiny_model(seed=3)
    source, source_mask = left_padded_source()
    options = dict(attention_mask=source_mask, max_new_tokens=8, min_new_tokens=8, num_beams=3, num_return_sequences=2)
    expected = model.generate(source, use_cache=False, **options)
    monkeypatch.setattr(EncoderDecoderCache, "reorder_cache", lambda self, beam_idx: None)
    assert not torch.equal(model.generate(source, **options), expected)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_padded_source_batches_generate_as_one_by_one(padding_side):
    model = tiny_model(seed=4)
    lengths = [6, 2, 4]
    sources = [torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(n)) for n in lengths]
    batch = torch.full((3, 6), PAD)
    for row, ids in enumerate(sources):
        if padding_side == "left":
            batch[row, 6 - len(ids) :] = ids
        else:
            batch[row, : len(ids)] = ids
    options = dict(max_new_tokens=6, min_new_tokens=6, num_beams=2)
    batched = model.generate(batch, attention_mask=batch.ne(PAD).long(), **options)
    for row, ids in enumerate(sources):
        alone = model.generate(ids[None], **options)
        assert torch.equal(batched[row], alone[0]), row
    with torch.no_grad():  # and the scores, not only the argmax
        decoder_ids = target(batch=3)
        batched_logits = model(batch, attention_mask=batch.ne(PAD).long(), decoder_input_ids=decoder_ids).logits
        for row, ids in enumerate(sources):
            alone = model(input_ids=ids[None], decoder_input_ids=decoder_ids[row : row + 1]).logits
            torch.testing.assert_close(batched_logits[row], alone[0], atol=1e-5, rtol=0)


def cache_sizes(cache) -> list[tuple]:
    return [
        (part, index, state, tuple(tensor.shape))
        for part in ("self_attention_cache", "cross_attention_cache")
        for index, layer in enumerate(getattr(cache, part).layers)
        for state, tensor in enumerate(layer.states)
        if tensor is not None
    ]


def test_the_cache_does_not_grow_with_the_source_or_the_target():
    model = tiny_model(dynamic_projection=False)  # all l slots, so that the packed length is the same
    sizes = []
    for source_length, target_length in [(5, 2), (30, 2), (5, 20)]:
        source = torch.randint(3, VOCAB, (2, source_length))
        with torch.no_grad():
            out = model(input_ids=source, decoder_input_ids=target(length=target_length), use_cache=True)
            out = model(input_ids=source, decoder_input_ids=target(length=1), cache=getattr(out, CACHE), use_cache=True)
        sizes.append(cache_sizes(getattr(out, CACHE)))
    assert sizes[0] == sizes[1] == sizes[2]
    # Per layer: the causal key and value sums, token count and pack queries; the cross-attention's keys and values.
    assert len(sizes[0]) == 2 * 4 + 2 * 2


def test_save_load_auto_classes_and_remote_code_without_luna_hf(tmp_path):
    model = tiny_model(seed=5)
    model.save_pretrained(tmp_path / "luna-mt")
    config = AutoConfig.from_pretrained(tmp_path / "luna-mt")
    assert config.model_type == "luna_seq2seq"
    assert config.auto_map["AutoModelForSeq2SeqLM"] == "modeling_luna_seq2seq.LunaForConditionalGeneration"
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "luna-mt").eval()
    assert type(reloaded) is LunaForConditionalGeneration
    assert reloaded.lm_head.weight is reloaded.model.decoder.embed_tokens.weight
    assert reloaded.model.decoder.embed_tokens.weight is reloaded.model.encoder.embed_tokens.weight
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    assert type(AutoModel.from_pretrained(tmp_path / "luna-mt")) is LunaSeq2SeqModel
    source, source_mask = left_padded_source()
    expected = model.generate(source, attention_mask=source_mask, max_new_tokens=5, num_beams=2)

    remote = hub_fixture.run_python(
        "import json, torch\nfrom transformers import AutoModelForSeq2SeqLM\n"
        f"model = AutoModelForSeq2SeqLM.from_pretrained({str(tmp_path / 'luna-mt')!r}, trust_remote_code=True).eval()\n"
        f"source = torch.tensor({source.tolist()})\n"
        f"generated = model.generate(source, attention_mask=source.ne({PAD}).long(), max_new_tokens=5, num_beams=2)\n"
        "print(json.dumps({'module': type(model).__module__, 'generated': generated.tolist()}))\n",
        hub_fixture.clean_env(tmp_path / "home", HF_HUB_OFFLINE=1),
        without_luna_hf=True,
    )
    assert remote["module"].startswith("transformers_modules.")
    assert remote["generated"] == expected.tolist()


def test_a_tiny_model_learns_to_reverse_sequences():
    torch.manual_seed(0)
    config = tiny_config(hidden_size=32, intermediate_size=64, num_attention_heads=4, vocab_size=12, projected_length=8)
    model = LunaForConditionalGeneration(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)

    def batch(size):
        source = torch.randint(3, 12, (size, 4))
        return source, torch.cat([source.flip(1), torch.full((size, 1), EOS)], dim=1)

    model.train()
    for _ in range(400):  # about 10 s on one CPU thread
        source, labels = batch(32)
        loss = model(input_ids=source, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    source, labels = batch(64)
    correct = model.generate(source, max_new_tokens=5, do_sample=False)[:, 1:] == labels
    # Chance is 1/9 per token; the reversal needs the cross-attention through P.
    assert correct.float().mean() >= 0.9 and correct.all(dim=1).float().mean() >= 0.75, (correct, loss.item())


@pytest.mark.parametrize("tied, extra", [(True, 4_740_096), (False, 12_619_776)])
def test_default_model_has_the_papers_parameter_count(tied, extra):
    """Table 4: Luna (l = 32) over Transformer-base (shared embeddings, sinusoidal positions), +4.74M tied and
    +12.62M untied, plus P (32 x 512). Transformer-base counted here from its layers."""
    d, ffn, vocab = 512, 2048, 1000
    linear = d * d + d
    feed_forward = d * ffn + ffn + ffn * d + d
    encoder_layer = 4 * linear + 2 * 2 * d + feed_forward  # attention, 2 LayerNorms, FFN
    decoder_layer = 8 * linear + 3 * 2 * d + feed_forward  # self- and cross-attention, 3 LayerNorms, FFN
    transformer_base = vocab * d + 6 * encoder_layer + 6 * decoder_layer
    with torch.device("meta"):
        model = LunaForConditionalGeneration(LunaSeq2SeqConfig(vocab_size=vocab, tie_key_value=tied))
    assert model.num_parameters() == transformer_base + extra + 32 * d


def test_bad_inputs_and_configs_raise_clear_errors():
    model = tiny_model()
    too_long = torch.randint(3, VOCAB, (1, 41))
    with pytest.raises(ValueError, match=r"exceeds this model's maximum of 40 tokens.*truncation=True"):
        model(input_ids=too_long, decoder_input_ids=target(batch=1))
    with pytest.raises(ValueError, match="non-empty batch"):
        model(input_ids=torch.zeros(1, 0, dtype=torch.long), decoder_input_ids=target(batch=1))
    with pytest.raises(ValueError, match="has no tokens.*at least one token"):
        model(input_ids=torch.tensor([[5, 6]]), attention_mask=torch.tensor([[0, 0]]), decoder_input_ids=target(1))
    with pytest.raises(ValueError, match="at least one token per row.*decoder_start_token_id"):
        model(input_ids=torch.tensor([[5, 6]]), decoder_input_ids=torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="max_position_embeddings=40.*max_length <= 40"):
        model(input_ids=torch.tensor([[5, 6]]), decoder_input_ids=target(batch=1, length=41))
    with pytest.raises(ValueError, match="EncoderDecoderCache"):
        model(input_ids=torch.tensor([[5, 6]]), decoder_input_ids=target(1), cache=EncoderDecoderCache(
            DynamicCache(), DynamicCache()))  # fmt: skip
    for field, value, message in [
        ("position_embedding_type", "rotary", "position_embedding_type must be one of"),
        ("num_attention_heads", 3, "divisible by num_attention_heads"),
        ("decoder_layers", 0, "decoder_layers must be a positive integer"),
        ("decoder_start_token_id", 99, r"decoder_start_token_id must be a token id in \[0, vocab_size=40\)"),
        ("hidden_dropout_prob", 1.0, r"hidden_dropout_prob must be in \[0, 1\)"),
    ]:
        with pytest.raises(ValueError, match=message):
            tiny_config(**{field: value})


def convert_script():
    spec = importlib.util.spec_from_file_location("convert_fairseq_luna_to_hf", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def translation_checkpoint(path, arch, **overrides):
    """A fairseq-apollo `luna` checkpoint at a tiny size: random weights under the authors' names (from a tiny model
    with perturbed biases and LayerNorms), their buffers, and the training arguments as fairseq saves them."""
    model = tiny_model(seed=6, tie_key_value=arch != "luna_base_untied")
    state = fairseq_state(model)
    state["encoder.projected_positions"] = fairseq_sinusoidal_table(4, 16, None)
    for side in ("encoder", "decoder"):
        state[f"{side}.version"] = torch.tensor([3.0])
        state[f"{side}.embed_positions._float_tensor"] = torch.zeros(1)
    args = dict(
        arch=arch, task="translation", criterion="label_smoothed_cross_entropy", share_all_embeddings=True,
        encoder_embed_dim=16, encoder_ffn_embed_dim=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=2, decoder_attention_heads=2, projection_length=4, max_source_positions=40,
        max_target_positions=40, dropout=0.3, attention_dropout=0.1, label_smoothing=0.1,
    )  # fmt: skip
    torch.save({"model": state, "args": argparse.Namespace(**{**args, **overrides})}, path)
    return state


@pytest.mark.parametrize("arch", ["luna_base_tied", "luna_base_untied"])
def test_converter_turns_an_authors_translation_checkpoint_into_the_same_model(tmp_path, arch):
    script = convert_script()
    state = translation_checkpoint(tmp_path / "model.pt", arch)
    arguments = script.Arguments(fairseq_checkpoint=str(tmp_path / "model.pt"), output_dir=str(tmp_path / "hf"))
    model = AutoModelForSeq2SeqLM.from_pretrained(script.convert(arguments)).eval()
    assert type(model) is LunaForConditionalGeneration
    config = model.config
    assert (config.tie_key_value, config.hidden_dropout_prob, config.max_position_embeddings) == (
        arch == "luna_base_tied", 0.3, 40)  # fmt: skip
    assert (config.projected_length, config.hidden_act, config.position_embedding_type) == (4, "relu", "sinusoidal")
    # fairseq-generate's beam and length, capped by the positions, not transformers' max_length=20; stored as a
    # total length, so that what a caller asks for wins: max_length, max_new_tokens, or Seq2SeqTrainer's limit
    generation = model.generation_config
    assert (generation.num_beams, generation.max_length, generation.max_new_tokens) == (5, 40, None)
    source = left_padded_source()[0]
    assert model.generate(source, max_length=4, num_beams=1).shape[1] <= 4
    assert model.generate(source, max_new_tokens=2, min_new_tokens=2, num_beams=1).shape[1] == 3
    trainer_args = Seq2SeqTrainingArguments(tmp_path / "eval", predict_with_generate=True, generation_max_length=5,
                                            generation_num_beams=1, report_to=[], use_cpu=True)  # fmt: skip
    rows = [dict(input_ids=row, labels=row[:3]) for row in source]
    predictions = Seq2SeqTrainer(model=model, args=trainer_args).predict(rows).predictions
    assert (predictions[:, 5:] == PAD).all()  # generated up to 5 (the Trainer pads to the stored length)
    source, source_mask = left_padded_source()
    with torch.no_grad():
        logits = model(input_ids=source, attention_mask=source_mask, decoder_input_ids=target()).logits
    expected = FairseqLunaMT(state, num_heads=2).forward(source, target())
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)


def test_converter_refuses_translation_arguments_that_disagree_with_the_tensors(tmp_path):
    script = convert_script()
    for name, overrides, message in [
        ("projection", dict(projection_length=8), "projection_length 8 vs 4"),
        ("embeddings", dict(layernorm_embedding=True), "--layernorm-embedding"),
    ]:
        translation_checkpoint(tmp_path / f"{name}.pt", "luna_base_tied", **overrides)
        arguments = script.Arguments(fairseq_checkpoint=str(tmp_path / f"{name}.pt"), output_dir=str(tmp_path / name))
        with pytest.raises(script.ConversionError, match=re.escape(message)):
            script.convert(arguments)
        assert not (tmp_path / name).exists()


def test_encoder_outputs_given_as_a_tuple_are_the_encoders_output():
    """return_dict=False callers and BART-style code hand the encoder's output back as a tuple."""
    model = tiny_model(seed=3).eval()
    source, source_mask = left_padded_source()
    decoder_input_ids = target()
    with torch.no_grad():
        encoder_outputs = model.get_encoder()(input_ids=source, attention_mask=source_mask)
        expected = model(encoder_outputs=encoder_outputs, attention_mask=source_mask,
                         decoder_input_ids=decoder_input_ids).logits  # fmt: skip
        as_tuple = model(encoder_outputs=encoder_outputs.to_tuple(), attention_mask=source_mask,
                         decoder_input_ids=decoder_input_ids).logits  # fmt: skip
        assert torch.equal(as_tuple, expected)
        with pytest.raises(ValueError, match="packed_hidden_state"):
            model(encoder_outputs=(encoder_outputs.last_hidden_state,), decoder_input_ids=decoder_input_ids)


def test_resizing_untied_embeddings_resizes_source_target_and_output_as_bart_does(tmp_path):
    model = tiny_model(seed=4, tie_word_embeddings=False).train()
    model.resize_token_embeddings(VOCAB + 6)
    embeddings = (model.model.encoder.embed_tokens, model.model.decoder.embed_tokens, model.lm_head)
    assert [module.weight.shape[0] for module in embeddings] == [VOCAB + 6] * 3 and model.config.vocab_size == VOCAB + 6
    assert embeddings[0].weight is not embeddings[1].weight  # still untied
    new_ids = torch.full((2, 4), VOCAB + 5)
    loss = model(input_ids=new_ids, labels=new_ids).loss  # a new id in the source, the target and the labels
    loss.backward()
    assert torch.isfinite(loss) and model.model.decoder.embed_tokens.weight.grad[VOCAB + 5].abs().sum() > 0
    model.eval().generate(new_ids, max_new_tokens=3, min_new_tokens=3)
    model.save_pretrained(tmp_path)
    reloaded = LunaForConditionalGeneration.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=new_ids, decoder_input_ids=new_ids).logits,
                           model(input_ids=new_ids, decoder_input_ids=new_ids).logits)  # fmt: skip


def test_hidden_states_are_returned_per_layer_and_attention_maps_refused_with_what_is_available():
    model = tiny_model(seed=3, normalize_before=True)
    source, source_mask = left_padded_source()
    with torch.no_grad():
        outputs = model(input_ids=source, attention_mask=source_mask, decoder_input_ids=target(),
                        output_hidden_states=True)  # fmt: skip
        encoder = model.get_encoder()(input_ids=source, attention_mask=source_mask, output_hidden_states=True)
    assert len(outputs.encoder_hidden_states) == len(outputs.decoder_hidden_states) == 3  # embeddings + 2 layers
    assert torch.equal(outputs.encoder_hidden_states[-1], outputs.encoder_last_hidden_state)  # after the final LN
    assert len(encoder.packed_hidden_states) == 3 and torch.equal(encoder.packed_hidden_states[-1],
                                                                  encoder.packed_hidden_state)  # fmt: skip
    # The decoder's last state is the one the LM head reads: the logits follow from it.
    torch.testing.assert_close(model.lm_head(outputs.decoder_hidden_states[-1]), outputs.logits)
    with torch.no_grad():
        generated = model.generate(source, attention_mask=source_mask, max_new_tokens=3, min_new_tokens=3,
                                   output_hidden_states=True, return_dict_in_generate=True)  # fmt: skip
    assert len(generated.encoder_hidden_states) == 3 and len(generated.decoder_hidden_states) == 3  # one per step
    refused = "does not return attention maps.*output_hidden_states=True"
    with pytest.raises(ValueError, match=refused):
        model(input_ids=source, decoder_input_ids=target(), output_attentions=True)
    with pytest.raises(ValueError, match=refused):
        model.generate(source, max_new_tokens=2, output_attentions=True, return_dict_in_generate=True)


def test_gradient_accumulation_gives_the_update_of_one_large_batch(tmp_path):
    """With the Trainer's num_items_in_batch the loss of 4 accumulated micro-batches sums to the one-batch loss,
    whatever the padding of each (the per-batch mean would weigh a short micro-batch's tokens more)."""
    generator = torch.Generator().manual_seed(0)
    rows = []
    for length in (2, 6, 3, 8):  # targets of different lengths: -100 padding where shorter
        labels = torch.full((8,), -100)
        labels[:length] = torch.randint(3, VOCAB, (length,), generator=generator)
        rows.append(dict(input_ids=torch.randint(3, VOCAB, (5,), generator=generator), labels=labels))

    def updated_weights(batch_size, accumulation):
        model = tiny_model(seed=5).train()
        arguments = Seq2SeqTrainingArguments(tmp_path / f"run{accumulation}", per_device_train_batch_size=batch_size,
                                             gradient_accumulation_steps=accumulation, max_steps=1, learning_rate=1.0,
                                             optim="sgd", lr_scheduler_type="constant", report_to=[],
                                             save_strategy="no", use_cpu=True, seed=0)  # fmt: skip
        Seq2SeqTrainer(model=model, args=arguments, train_dataset=rows).train()
        return model.lm_head.weight.detach().clone()

    torch.testing.assert_close(updated_weights(1, 4), updated_weights(4, 1), atol=1e-5, rtol=0)


def test_generate_leaves_the_callers_encoder_outputs_as_they_were():
    model = tiny_model(seed=3)
    source, source_mask = left_padded_source()
    with torch.no_grad():
        encoder_outputs = model.get_encoder()(input_ids=source, attention_mask=source_mask)
    shapes = {name: tuple(value.shape) for name, value in encoder_outputs.items()}
    settings = dict(attention_mask=source_mask, max_new_tokens=4, num_beams=3, num_return_sequences=2, do_sample=False)
    first = model.generate(encoder_outputs=encoder_outputs, **settings)
    second = model.generate(encoder_outputs=encoder_outputs, **settings)
    assert {name: tuple(value.shape) for name, value in encoder_outputs.items()} == shapes
    assert torch.equal(first, second) and torch.equal(first, model.generate(source, **settings))


def test_the_fairseq_task_decides_whether_a_checkpoint_is_a_translation_model():
    """A masked-LM checkpoint whose arch name is also a translation arch's is converted as what its task says."""
    is_translation = convert_script().is_translation

    def checkpoint(names=("encoder.layers.0.x",), **args):
        return {"model": dict.fromkeys(names), "args": argparse.Namespace(**args)}

    assert not is_translation(checkpoint(task="masked_lm", arch="luna_base_tied"))
    assert is_translation(checkpoint(task="translation", arch="luna_base_tied"))
    assert is_translation(checkpoint(arch="luna_base_tied"))
    assert not is_translation(checkpoint(arch="luna_base_tied_512"))
    assert is_translation(checkpoint(names=("encoder.layers.0.x", "decoder.layers.0.x")))
    assert not is_translation(checkpoint())


def test_a_filled_cache_is_not_expanded_to_another_batch():
    model = tiny_model(seed=3)
    source, source_mask = left_padded_source()
    with torch.no_grad():
        out = model(input_ids=source, attention_mask=source_mask, decoder_input_ids=target(length=1), use_cache=True)
        with pytest.raises(ValueError, match="holds the states of 2 targets, the input has 4.*cannot be expanded"):
            model(input_ids=source.repeat(2, 1), decoder_input_ids=target(batch=4, length=1), use_cache=True,
                  **{CACHE: getattr(out, CACHE)})  # fmt: skip

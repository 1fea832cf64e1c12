"""Causal Luna (paper §3.3): LunaCausalAttention against the authors' computation (tests/luna_causal_reference.py) and
against a per-step implementation of the paper's formulas written here; LunaForCausalLM's causality, cached
decoding, generate() (greedy, sampling, beam search, left-padded batches), training, saving, Auto classes, remote
code and the text-generation pipeline."""

import math
import sys
from pathlib import Path

import pytest
import torch
import transformers
from luna_causal_reference import authors_causal_attention
from packaging.version import Version
from transformers import AutoModelForCausalLM, DynamicCache, pipeline

from luna_hf import LunaCache, LunaConfig, LunaForCausalLM
from luna_hf.modeling_luna_attention import LunaCausalAttention
from luna_hf.transformers_compat import CACHE_OUTPUT_NAME as CACHE  # generate()'s cache argument and output name

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hub_fixture  # noqa: E402

PAD = 1
# The authors' parameter names -> luna_hf's (tied: c_proj is the one key/value projection).
AUTHORS_TO_HF = {"pq_proj": "pack_query_proj", "pc_proj": "pack_key_proj", "q_proj": "q_proj", "c_proj": "kv_proj",
                 "k_proj": "k_proj", "v_proj": "v_proj", "out_proj": "o_proj"}  # fmt: skip


def causal_config(**kwargs) -> LunaConfig:
    defaults = dict(
        is_decoder=True, vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, projected_length=5, max_position_embeddings=130, causal_chunk_size=4,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return LunaConfig(**{**defaults, **kwargs})


def causal_model(seed=0, **kwargs) -> LunaForCausalLM:
    torch.manual_seed(seed)
    return LunaForCausalLM(causal_config(**kwargs)).eval()


def random_ids(batch, length, seed=0):
    return torch.randint(3, 40, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------------
# The attention against the authors' computation and against the formulas


def authors_state(tie_key_value: bool, width: int, seed: int) -> dict:
    """Random weights under the authors' names: unit-scale projections, so that the unpack weights are far from
    uniform (from about 0.02 to 0.64 here), and outputs of order 1."""
    generator = torch.Generator().manual_seed(seed)
    names = ["pq_proj", "pc_proj", "q_proj", "out_proj"] + (["c_proj"] if tie_key_value else ["k_proj", "v_proj"])
    state = {}
    for name in names:
        scale = 0.5 if name == "out_proj" else 1.0
        state[name + ".weight"] = torch.randn(width, width, generator=generator) * scale * width**-0.5
        state[name + ".bias"] = torch.randn(width, generator=generator) * 0.3
    return state


def attention_from_authors(state: dict, **config_kwargs) -> LunaCausalAttention:
    attention = LunaCausalAttention(causal_config(**config_kwargs), layer_idx=0).eval()
    hf_state = {}
    for name, tensor in state.items():
        module, kind = name.rsplit(".", 1)
        hf_state[f"{AUTHORS_TO_HF[module]}.{kind}"] = tensor
    attention.load_state_dict(hf_state, strict=True)
    return attention


def run_attention(attention, hidden, packed, token_mask=None, slot_mask=None):
    token_mask = torch.ones(hidden.shape[:2], dtype=torch.long) if token_mask is None else token_mask
    with torch.no_grad():
        output, _ = attention(hidden, packed, token_mask, token_mask.cumsum(1), slot_mask=slot_mask)
    return output


@pytest.mark.parametrize("activation", ["softplus", "elu"])
@pytest.mark.parametrize("tie_key_value", [True, False])
def test_causal_attention_matches_the_authors_with_their_parameters_mapped_by_name(tie_key_value, activation):
    width, length, slots, batch = 32, 11, 5, 3
    state = authors_state(tie_key_value, width, seed=1)
    attention = attention_from_authors(state, tie_key_value=tie_key_value, causal_activation=activation)
    generator = torch.Generator().manual_seed(2)
    hidden = torch.randn(batch, length, width, generator=generator)
    packed = torch.randn(batch, slots, width, generator=generator)  # P per row, as the authors' MT decoder gets it
    slot_mask = torch.ones(batch, slots, dtype=torch.long)
    slot_mask[1, 3:] = 0  # the authors' pkey_padding_mask (True = masked) is slot_mask == 0
    expected = authors_causal_attention(
        state, hidden.transpose(0, 1), packed.transpose(0, 1), 4, slot_mask == 0, activation
    ).transpose(0, 1)
    assert (run_attention(attention, hidden, packed, slot_mask=slot_mask) - expected).abs().max() <= 1e-5
    # One P for the whole batch (the decoder-only model's learned P) is the same computation.
    shared = authors_causal_attention(state, hidden.transpose(0, 1), packed[:1].expand(batch, -1, -1).transpose(0, 1),
                                      4, activation=activation).transpose(0, 1)  # fmt: skip
    assert (run_attention(attention, hidden, packed[0]) - shared).abs().max() <= 1e-5


def test_padding_counts_only_real_tokens_where_the_authors_count_raw_positions():
    state = authors_state(True, 32, seed=3)
    attention = attention_from_authors(state)
    generator = torch.Generator().manual_seed(4)
    row, packed = torch.randn(1, 7, 32, generator=generator), torch.randn(5, 32, generator=generator)
    alone = authors_causal_attention(state, row.transpose(0, 1), packed[:, None], 4).transpose(0, 1)
    pads = torch.randn(1, 3, 32, generator=generator)
    # Right padding: the authors' raw positions equal the real-token counts, so the real tokens agree.
    right = run_attention(attention, torch.cat([row, pads], 1), packed, torch.tensor([[1] * 7 + [0] * 3]))
    assert (right[:, :7] - alone).abs().max() <= 1e-5
    # Left padding: t counts real tokens and the pads add nothing to the sums, so the row is as if alone.
    left = run_attention(attention, torch.cat([pads, row], 1), packed, torch.tensor([[0] * 3 + [1] * 7]))
    assert (left[:, 3:] - alone).abs().max() <= 1e-5
    assert torch.isfinite(left).all()


@torch.no_grad()
def per_step_causal_attention(attention, hidden, packed, token_mask):
    """The paper's formulas one position at a time, with running sums, in float64 (no chunks, no cache)."""
    weight = {name: parameter.double() for name, parameter in attention.named_parameters()}

    def heads(x, name):  # (..., hidden) -> (..., H, K)
        projected = x @ weight[name + ".weight"].T + weight[name + ".bias"]
        return projected.unflatten(-1, (4, -1))

    scaling = attention.head_dim**-0.5
    pack_queries = heads(packed, "pack_query_proj") * scaling  # l x H x K
    key_name, value_name = ("kv_proj", "kv_proj") if "kv_proj.weight" in weight else ("k_proj", "v_proj")
    outputs = torch.zeros_like(hidden)
    for b in range(hidden.shape[0]):
        key_sums, value_sums, count = 0.0, 0.0, 0
        for t in range(hidden.shape[1]):
            x = hidden[b, t]
            real = bool(token_mask[b, t])
            count += real
            pack = torch.einsum("hk,lhk->hl", heads(x, "pack_key_proj"), pack_queries)
            pack = torch.nn.functional.softplus(pack, beta=math.log(2.0)) * real  # H x l
            key_sums = key_sums + torch.einsum("hk,hl->hkl", heads(x, key_name), pack)
            value_sums = value_sums + torch.einsum("hl,hk->hlk", pack, heads(x, value_name))
            t_real = max(count, 1)
            scores = torch.einsum("hk,hkl->hl", heads(x, "q_proj") * scaling, key_sums) / t_real
            unpacked = torch.einsum("hl,hlk->hk", scores.softmax(-1), value_sums) / t_real
            outputs[b, t] = unpacked.flatten() @ weight["o_proj.weight"].T + weight["o_proj.bias"]
    return outputs


@pytest.mark.parametrize("tie_key_value", [True, False])
def test_chunked_form_equals_the_per_step_formulas_for_every_chunk_size(tie_key_value):
    length = 13
    generator = torch.Generator().manual_seed(5)
    hidden = torch.randn(2, length, 32, generator=generator, dtype=torch.float64)
    packed = torch.randn(5, 32, generator=generator, dtype=torch.float64)
    token_mask = torch.ones(2, length, dtype=torch.long)
    token_mask[1, :4] = 0  # a left-padded row
    state = authors_state(tie_key_value, 32, seed=6)
    expected = None
    for chunk_size in (1, 2, 3, 4, 5, 8, 13, 64):  # 2, 3, 4, 5 and 8 do not divide 13; 64 > 13
        attention = attention_from_authors(state, tie_key_value=tie_key_value, causal_chunk_size=chunk_size).double()
        if expected is None:
            expected = per_step_causal_attention(attention, hidden, packed, token_mask)
        output = run_attention(attention, hidden, packed, token_mask)
        assert (output - expected).abs().max() <= 1e-10, chunk_size


# ---------------------------------------------------------------------------------------------------------------------
# The causal language model


def test_config_and_model_reject_bad_values_clearly():
    with pytest.raises(ValueError, match="causal_activation must be one of"):
        LunaConfig(causal_activation="softmax")
    for chunk_size in (0, -4, 2.5):
        with pytest.raises(ValueError, match="causal_chunk_size must be a positive integer"):
            LunaConfig(causal_chunk_size=chunk_size)
    with pytest.raises(ValueError, match="is_decoder=True"):
        LunaForCausalLM(causal_config(is_decoder=False))
    model = causal_model()
    with pytest.raises(ValueError, match="pass LunaCache\\(config\\).*got DynamicCache"):
        model(random_ids(1, 4), cache=DynamicCache(), use_cache=True)
    with pytest.raises(ValueError, match="129 tokens exceed the model's 128"):
        model(random_ids(1, 129))


def test_changing_future_tokens_never_changes_earlier_outputs():
    model = causal_model(causal_chunk_size=3)
    ids = random_ids(2, 17)
    with torch.no_grad():
        logits = model(ids).logits
        for cut in (1, 5, 9, 16):
            changed = torch.cat([ids[:, :cut], random_ids(2, 17 - cut, seed=cut)], dim=1)
            assert torch.equal(changed[:, :cut], ids[:, :cut])
            assert (model(changed).logits[:, :cut] - logits[:, :cut]).abs().max() <= 1e-5


def test_loss_is_the_shifted_next_token_cross_entropy():
    model = causal_model()
    ids = random_ids(2, 9)
    output = model(ids, labels=ids)
    expected = torch.nn.functional.cross_entropy(output.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert output.loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert model.lm_head.decoder.weight is model.luna.embeddings.word_embeddings.weight


@pytest.mark.parametrize("tie_key_value", [True, False])
def test_cached_decoding_reproduces_the_full_forward(tie_key_value):
    model = causal_model(tie_key_value=tie_key_value)
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
    # Constant size: key sums, value sums, token count, pack queries, whatever the context.
    assert sizes == [tuple(state.shape) for state in cache.layers[1].states]
    assert sizes == [(2, 4, 8, 5), (2, 4, 5, 8), (2,), (2, 4, 5, 8)]
    assert cache.layers[1].states[2].tolist() == [12, 15]


def greedy_without_cache(model, ids, steps):
    for _ in range(steps):
        with torch.no_grad():
            next_token = model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_token], dim=1)
    return ids


def test_generate_greedy_sampling_and_beam_search():
    model = causal_model(seed=1)
    prompt = random_ids(2, 7)
    lengths = []  # tokens each forward of generate() reads: the prompt, then one at a time

    def record(module, args, kwargs):
        lengths.append(args[0].shape[1])

    model.luna.register_forward_pre_hook(record, with_kwargs=True)
    greedy = model.generate(prompt, max_new_tokens=10, do_sample=False)
    assert torch.equal(greedy, greedy_without_cache(model, prompt, 10))
    assert lengths[:10] == [7] + [1] * 9

    def sample(use_cache):
        torch.manual_seed(0)
        return model.generate(prompt, max_new_tokens=10, do_sample=True, top_k=0, use_cache=use_cache)

    assert torch.equal(sample(True), sample(False))
    assert not torch.equal(sample(True), greedy)
    # Beam search reorders the cache (index_select of every running sum) between steps.
    beams = dict(max_new_tokens=8, num_beams=3, num_return_sequences=2, do_sample=False)
    assert torch.equal(model.generate(prompt, **beams), model.generate(prompt, use_cache=False, **beams))


@pytest.mark.parametrize("num_beams", [1, 3])
def test_left_padded_batch_generates_what_each_prompt_generates_alone(num_beams):
    model = causal_model(seed=2)
    prompts = [random_ids(1, n, seed=n)[0] for n in (3, 9, 6)]
    longest = max(len(prompt) for prompt in prompts)
    ids = torch.full((len(prompts), longest), PAD)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt) :], mask[row, longest - len(prompt) :] = prompt, 1
    settings = dict(max_new_tokens=8, do_sample=False, num_beams=num_beams, pad_token_id=PAD, eos_token_id=None)
    batched = model.generate(ids, attention_mask=mask, **settings)[:, longest:]
    for row, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], **settings)[:, len(prompt) :]
        assert torch.equal(batched[row], alone[0]), row


@pytest.mark.parametrize("fill", ["pad id", "id 0", "random ids"])
def test_padded_positions_do_not_change_the_real_tokens_whatever_fills_them(fill):
    model = causal_model(seed=2)
    rows = [random_ids(1, n, seed=n)[0] for n in (3, 9)]
    ids = random_ids(2, 12, seed=7) if fill == "random ids" else torch.full((2, 12), PAD if fill == "pad id" else 0)
    mask = torch.zeros_like(ids)
    for row, tokens in enumerate(rows):
        ids[row, 12 - len(tokens) :], mask[row, 12 - len(tokens) :] = tokens, 1
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
        for row, tokens in enumerate(rows):
            alone = model(tokens[None]).logits[0]
            torch.testing.assert_close(logits[row, 12 - len(tokens) :], alone, atol=1e-5, rtol=0)


def continuation_settings(**kwargs):
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=PAD, eos_token_id=None, output_logits=True,
                    return_dict_in_generate=True)  # fmt: skip
    return {**settings, **kwargs}


@pytest.mark.parametrize("source", ["prefilled cache", "cache returned by generate", "left-padded batch"])
def test_generation_continues_from_a_cache_that_already_holds_the_prefix(source):
    """transformers' prompt-caching pattern: pass the whole text and a cache holding its beginning; generate() must
    feed only the rest (the cache reports the positions it consumed) and give a fresh run's tokens and logits."""
    model = causal_model(seed=5)
    prefix, rest = random_ids(2, 7, seed=1), random_ids(2, 4, seed=2)
    mask = torch.ones(2, 11, dtype=torch.long)
    if source == "left-padded batch":
        prefix[0, :3], mask[0, :3] = PAD, 0
    cache = LunaCache(model.config)
    if source == "cache returned by generate":
        first = model.generate(prefix, **continuation_settings(max_new_tokens=3, **{CACHE: cache}))
        prefix, mask = first.sequences, torch.ones(2, 14, dtype=torch.long)
        cache = getattr(first, CACHE)  # it has read the prompt and all generated tokens but the last
    else:
        with torch.no_grad():
            model(prefix, attention_mask=mask[:, :7], cache=cache)
    text = torch.cat([prefix, rest], dim=1)
    assert int(cache.get_seq_length()) == text.shape[1] - 4 - (source == "cache returned by generate")
    fresh = model.generate(text, attention_mask=mask, **continuation_settings())
    continued = model.generate(text, attention_mask=mask, **continuation_settings(**{CACHE: cache}))
    assert torch.equal(continued.sequences, fresh.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(continued.logits, fresh.logits, strict=True)) <= 1e-5
    assert int(getattr(continued, CACHE).get_seq_length()) == continued.sequences.shape[1] - 1


def test_generation_from_embeddings_continues_from_a_cache_that_holds_their_prefix():
    model = causal_model(seed=5)
    ids = random_ids(1, 9, seed=3)
    embeddings = model.get_input_embeddings()(ids).detach()
    cache = LunaCache(model.config)
    with torch.no_grad():
        model(inputs_embeds=embeddings[:, :5], cache=cache)
    settings = dict(max_new_tokens=4, do_sample=False)
    continued = model.generate(inputs_embeds=embeddings, **{CACHE: cache}, **settings)
    assert torch.equal(continued, model.generate(ids, **settings)[:, 9:])


def test_chunked_prefill_generates_what_a_single_prefill_does():
    """Also from a cache that holds the prompt's first tokens: the chunks must start after them."""
    model = causal_model(seed=6)
    prompt = random_ids(2, 11)
    settings = dict(max_new_tokens=5, do_sample=False)
    single = model.generate(prompt, **settings)
    assert torch.equal(model.generate(prompt, prefill_chunk_size=4, **settings), single)
    cache = LunaCache(model.config)
    with torch.no_grad():
        model(prompt[:, :3], cache=cache)
    if Version(transformers.__version__) >= Version("5.21"):
        assert torch.equal(model.generate(prompt, prefill_chunk_size=4, **{CACHE: cache}, **settings), single)
    else:  # transformers before 5.21 chunks the whole prompt, as if the cache were empty: refused, not misread
        with pytest.raises(ValueError, match="the cache has read"):
            model.generate(prompt, prefill_chunk_size=4, **{CACHE: cache}, **settings)


def test_a_filled_cache_is_not_expanded_or_reused_for_another_text():
    """Running sums cannot be expanded to more rows or rewound: each misuse stops with a message instead of wrong
    tokens (reuse) or a shape error deep in the attention (beam search, several sequences per prompt)."""
    model = causal_model(seed=5)
    prompt = random_ids(2, 7, seed=1)
    first = model.generate(prompt, **continuation_settings(max_new_tokens=3, **{CACHE: LunaCache(model.config)}))
    state = [tensor.clone() for tensor in getattr(first, CACHE).layers[0].states]
    with pytest.raises(ValueError, match="has already read 9 positions"):
        model.generate(prompt, **continuation_settings(**{CACHE: getattr(first, CACHE)}))
    for expanding in (dict(num_beams=2), dict(do_sample=True, num_return_sequences=2)):
        with pytest.raises(ValueError, match="cannot be expanded"):
            model.generate(first.sequences, **continuation_settings(**{CACHE: getattr(first, CACHE)}, **expanding))
    with pytest.raises(ValueError, match="attention mask covers 4 positions"), torch.no_grad():
        model(first.sequences[:, -2:], attention_mask=torch.ones(2, 4, dtype=torch.long), cache=getattr(first, CACHE))
    # Refused before anything was added: the cache still continues its own text correctly.
    assert all(torch.equal(a, b) for a, b in zip(state, getattr(first, CACHE).layers[0].states, strict=True))
    assert int(getattr(first, CACHE).get_seq_length()) == 9


@pytest.mark.parametrize("method", [dict(prompt_lookup_num_tokens=2), "assistant_model"])
def test_generation_methods_that_roll_the_cache_back_are_refused_clearly(method):
    model = causal_model(seed=6)
    method = dict(assistant_model=causal_model(seed=7)) if method == "assistant_model" else method
    # Luna's message, or (before transformers 5.1x) transformers' own refusal for every stateful model.
    with pytest.raises(ValueError, match="cannot be rolled back|not supported with stateful models"):
        model.generate(random_ids(1, 8), max_new_tokens=4, do_sample=False, **method)


def test_a_tiny_model_learns_to_continue_a_repetitive_text():
    pattern = torch.tensor([5, 9, 12, 7, 30, 22, 14, 3, 18, 25, 11])  # period 11
    text = pattern.repeat(20)
    model = causal_model(seed=3, causal_chunk_size=8)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(120):
        starts = torch.randint(0, len(text) - 33, (8,), generator=generator)
        batch = torch.stack([text[s : s + 33] for s in starts.tolist()])
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1
    model.eval()
    prompt = text[4:14][None]  # 10 tokens, starting mid-period
    continuation = model.generate(prompt, max_new_tokens=25, do_sample=False)[0, 10:]
    assert torch.equal(continuation, text[14:39])


def test_save_load_round_trip_auto_class_and_text_generation_pipeline(tmp_path):
    tokenizer = hub_fixture.build_tokenizer()
    model, _ = hub_fixture.save_tiny_model(LunaForCausalLM, tmp_path, tokenizer, seed=4, is_decoder=True)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is LunaForCausalLM
    assert reloaded.lm_head.decoder.weight is reloaded.luna.embeddings.word_embeddings.weight
    inputs = tokenizer("the movie was", return_tensors="pt")  # <s> ... </s>, as the pipeline encodes it
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reloaded(**inputs).logits)
    expected = model.generate(**inputs, max_new_tokens=6, do_sample=False)[0].tolist()
    generator = pipeline("text-generation", model=str(tmp_path))
    generated = generator("the movie was", max_new_tokens=6, do_sample=False, return_tensors=True)[0]
    assert generated["generated_token_ids"] == expected and len(expected) > inputs.input_ids.shape[1]

    remote = hub_fixture.run_python(
        "import json\nfrom transformers import pipeline\n"
        f"generator = pipeline('text-generation', model={str(tmp_path)!r}, trust_remote_code=True)\n"
        "out = generator('the movie was', max_new_tokens=6, do_sample=False, return_tensors=True)[0]\n"
        "print(json.dumps({'ids': out['generated_token_ids'], 'module': type(generator.model).__module__}))\n",
        hub_fixture.clean_env(tmp_path / "home", HF_HUB_OFFLINE=1),
        without_luna_hf=True,
    )
    assert remote["module"].startswith("transformers_modules.")
    assert remote["ids"] == expected

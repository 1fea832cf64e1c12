"""Export a Luna model to ONNX with dynamic batch size and sequence length (`scripts/export_onnx.py` is its command
line, with the onnxruntime check; docs/deploy.md).

    from luna_hf.onnx_export import export_to_onnx

    inputs = tokenizer(["a sentence", "another one"], padding=True, return_tensors="pt")
    export_to_onnx(model, inputs, ["logits"], "model.onnx")

The exported graph keeps all `projected_length` slots of P (slots beyond a row's length are masked), so
`packed_hidden_state` has l slots where eager PyTorch may cut it shorter; every other output is the same.
"""

from pathlib import Path

import torch
from torch import nn
from transformers.cache_utils import EncoderDecoderCache

from .modeling_luna_attention import LunaCache
from .modeling_luna_seq2seq import LunaSeq2SeqEncoderOutput


def export_to_onnx(model, inputs: dict, output_names: list[str], path, opset: int | None = None) -> Path:
    """Trace `model` on `inputs` (input_ids and attention_mask, at least 2 tokens) with torch's dynamo exporter and
    write the ONNX program to `path`; batch size and length stay dynamic up to the model's maximum length."""
    batch = torch.export.Dim("batch_size", min=1, max=4096)
    length = torch.export.Dim("sequence_length", min=2, max=model.config.max_sequence_length)
    program = torch.onnx.export(
        model, (), kwargs=dict(inputs), dynamic_shapes={name: {0: batch, 1: length} for name in inputs},
        input_names=list(inputs), output_names=output_names, opset_version=opset, dynamo=True, verbose=False,
    )  # fmt: skip
    program.save(str(path))
    return Path(path)


# ---------------------------------------------------------------------------------------------------------------------
# The translation model: an encoder graph and two decoder-step graphs whose constant-size cache is explicit tensors,
# in the layout of Optimum's seq2seq exports (encoder_model, decoder_model, decoder_with_past_model).

ENCODER_OUTPUTS = ["last_hidden_state", "packed_hidden_state", "packed_attention_mask"]


class TranslationEncoder(nn.Module):
    """The source's encoding: what every decoding step reads."""

    def __init__(self, model):
        super().__init__()
        self.encoder = model.get_encoder()

    def forward(self, input_ids, attention_mask):
        outputs = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        return tuple(outputs[name] for name in ENCODER_OUTPUTS)


class TranslationDecoderStep(nn.Module):
    """One decoding step of a `LunaForConditionalGeneration`, its cache in and out as plain tensors. Without `past`
    (the first step) it reads the encoder's states and computes what the cache keeps of them (the cross-attention's
    keys and values, the causal attention's pack queries); with `past` it reads P's mask only. Per decoder layer the
    cache is the causal attention's states (key sums, value sums, token count, pack queries) then the
    cross-attention's (key, value): `state_names(config)`. The graph checks no position limit: decode at most
    `max_position_embeddings` tokens."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, decoder_input_ids, attention_mask, packed_hidden_state, packed_attention_mask,
                encoder_hidden_states=None, past=()):  # fmt: skip
        config = self.model.config
        cache = EncoderDecoderCache(LunaCache(config), LunaCache(config))
        per_layer, own = len(SELF_STATES) + len(CROSS_STATES), len(SELF_STATES)
        for layer, start in enumerate(range(0, len(past), per_layer)):
            cache.self_attention_cache.write(layer, past[start : start + own], consumed_length=0)
            cache.cross_attention_cache.write(layer, past[start + own : start + per_layer], consumed_length=0)
        encoder_outputs = LunaSeq2SeqEncoderOutput(last_hidden_state=encoder_hidden_states,
                                                   packed_hidden_state=packed_hidden_state,
                                                   packed_attention_mask=packed_attention_mask)  # fmt: skip
        logits = self.model(attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                            encoder_outputs=encoder_outputs, cache=cache, use_cache=True).logits  # fmt: skip
        present = [state for layer in range(config.decoder_layers)
                   for part in (cache.self_attention_cache, cache.cross_attention_cache)
                   for state in part.read(layer)]  # fmt: skip
        return logits[:, -1], *present


SELF_STATES = ("key_sums", "value_sums", "token_count", "pack_queries")  # LunaCausalAttention's cache layer
CROSS_STATES = ("cross_key", "cross_value")  # LunaCrossAttention's: the unpack keys and values of Y_P


def state_names(config) -> list[str]:
    return [f"{layer}.{kind}" for layer in range(config.decoder_layers) for kind in (*SELF_STATES, *CROSS_STATES)]


def full_length_packed(encoded: tuple, projected_length: int) -> tuple:
    """The eager encoder cuts P to the longest source (dynamic projection); the exported one keeps all l slots, masked
    beyond each row's length, so the decoder steps are traced on P padded to l (zero states, mask 0)."""
    last_hidden_state, packed, packed_mask = encoded
    missing = projected_length - packed.shape[1]
    packed, packed_mask = nn.functional.pad(packed, (0, 0, 0, missing)), nn.functional.pad(packed_mask, (0, missing))
    return last_hidden_state, packed, packed_mask


def export_translation_to_onnx(model, inputs: dict, folder, opset: int | None = None) -> dict[str, Path]:
    """Write `encoder_model.onnx`, `decoder_model.onnx` (the first step) and `decoder_with_past_model.onnx` (every
    later step) of a `LunaForConditionalGeneration` to `folder`, traced on `inputs` (the source's input_ids and
    attention_mask, at least 2 tokens); batch size and source length stay dynamic. A step's inputs are the one new
    token per row (`decoder_input_ids`, (batch, 1)), the source's mask, the encoder's P and its mask, then the
    encoder's states (first step) or `past.<name>` (later steps); its outputs `logits` (batch, vocab) and
    `present.<name>`, names from `state_names`. `luna_hf.onnx_export.greedy_translate` decodes with them."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config
    batch = torch.export.Dim("batch_size", min=1, max=4096)
    source = torch.export.Dim("source_length", min=2, max=config.max_position_embeddings)
    source_shapes = {"input_ids": {0: batch, 1: source}, "attention_mask": {0: batch, 1: source}}
    paths = {name: folder / f"{name}.onnx" for name in ("encoder_model", "decoder_model", "decoder_with_past_model")}
    with torch.no_grad():
        encoded = full_length_packed(TranslationEncoder(model)(**inputs), config.projected_length)
    torch.onnx.export(TranslationEncoder(model), (), kwargs=dict(inputs), dynamic_shapes=source_shapes,
                      input_names=list(inputs), output_names=ENCODER_OUTPUTS, opset_version=opset, dynamo=True,
                      verbose=False).save(str(paths["encoder_model"]))  # fmt: skip
    start = torch.full((inputs["input_ids"].shape[0], 1), config.decoder_start_token_id)
    step = {"decoder_input_ids": start, "attention_mask": inputs["attention_mask"],
            "packed_hidden_state": encoded[1], "packed_attention_mask": encoded[2]}  # fmt: skip
    shapes = {"decoder_input_ids": {0: batch}, "attention_mask": source_shapes["attention_mask"],
              "packed_hidden_state": {0: batch}, "packed_attention_mask": {0: batch}}  # fmt: skip
    names = state_names(config)
    with torch.no_grad():
        first = TranslationDecoderStep(model)(**step, encoder_hidden_states=encoded[0])
    torch.onnx.export(
        TranslationDecoderStep(model), (), kwargs={**step, "encoder_hidden_states": encoded[0]},
        dynamic_shapes={**shapes, "encoder_hidden_states": {0: batch, 1: source}},
        input_names=[*step, "encoder_hidden_states"], output_names=["logits", *(f"present.{n}" for n in names)],
        opset_version=opset, dynamo=True, verbose=False,
    ).save(str(paths["decoder_model"]))  # fmt: skip
    past = tuple(first[1:])
    torch.onnx.export(
        TranslationDecoderStep(model), (), kwargs={**step, "past": past},
        dynamic_shapes={**shapes, "past": tuple({0: batch} for _ in past)},
        input_names=[*step, *(f"past.{n}" for n in names)], output_names=["logits", *(f"present.{n}" for n in names)],
        opset_version=opset, dynamo=True, verbose=False,
    ).save(str(paths["decoder_with_past_model"]))  # fmt: skip
    return paths


def greedy_translate(sessions: dict, input_ids, attention_mask, config, max_new_tokens: int, forced_tokens=None):
    """Greedy decoding with the three onnxruntime sessions of `export_translation_to_onnx` (numpy in and out), as
    `generate(num_beams=1, do_sample=False)` decodes: the tokens after `config.decoder_start_token_id`, a finished
    row (`config.eos_token_id`) continuing with `config.pad_token_id`; a generation_config's other rules (forced
    tokens, n-gram bans, minimum length) are not applied. `forced_tokens` (batch, steps) are fed instead
    of the argmax (scoring a given translation). Returns the tokens (batch, steps) and each step's logits (batch,
    steps, vocab)."""
    import numpy as np

    steps = max_new_tokens if forced_tokens is None else forced_tokens.shape[1]
    if steps == 0:
        return np.zeros((input_ids.shape[0], 0), np.int64), np.zeros((input_ids.shape[0], 0, config.vocab_size))
    last_hidden_state, packed, packed_mask = sessions["encoder_model"].run(
        None, {"input_ids": input_ids, "attention_mask": attention_mask})  # fmt: skip
    feed = {"attention_mask": attention_mask, "packed_hidden_state": packed, "packed_attention_mask": packed_mask}
    start = np.full((input_ids.shape[0], 1), config.decoder_start_token_id, dtype=np.int64)
    outputs = sessions["decoder_model"].run(None, {**feed, "decoder_input_ids": start,
                                                   "encoder_hidden_states": last_hidden_state})  # fmt: skip
    names = [f"past.{name}" for name in state_names(config)]
    tokens, scores, finished = [], [], np.zeros(input_ids.shape[0], dtype=bool)
    for step in range(steps):
        logits, present = outputs[0], outputs[1:]
        if forced_tokens is None:
            new = np.where(finished, config.pad_token_id, logits.argmax(-1))
            finished |= new == config.eos_token_id
        else:
            new = forced_tokens[:, step]
        tokens.append(new)
        scores.append(logits)
        if finished.all():
            break
        past = dict(zip(names, present, strict=True))
        outputs = sessions["decoder_with_past_model"].run(None, {**feed, "decoder_input_ids": new[:, None], **past})
    return np.stack(tokens, axis=1), np.stack(scores, axis=1)

"""The conversion API (`luna_hf.convert_to_luna`, `luna_hf.transfer_attention`) and its command lines
(scripts/convert_to_luna.py, scripts/transfer_attention.py) on tiny random BERT and RoBERTa models built here."""

import importlib.util
import json
import os
import re
from pathlib import Path

import pytest
import safetensors.torch
import torch
from hub_fixture import run_python
from torch import nn
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForMultipleChoice,
    BertForPreTraining,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    BertTokenizer,
    DistilBertConfig,
    DistilBertModel,
    RobertaConfig,
    RobertaForMaskedLM,
    RobertaForMultipleChoice,
    RobertaForSequenceClassification,
    RobertaModel,
)

import luna_hf
from luna_hf.attention_transfer import AttentionTransfer, text_dataset
from luna_hf.conversion import ConversionError, is_new_attention_parameter, is_transferred_parameter, save_folder
from luna_hf.text_sources import passages

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


convert_script, transfer_script = load_script("convert_to_luna"), load_script("transfer_attention")

WORDS = ["the", "film", "is", "good", "bad", "a", "very", "movie", "not", "great", "dull", "fun"]
LABELS = {
    "id2label": {0: "negative", 1: "positive", 2: "neutral"},
    "label2id": {"negative": 0, "positive": 1, "neutral": 2},
}


def bert_config(**overrides):
    settings = dict(vocab_size=5 + len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=64, max_position_embeddings=32, type_vocab_size=2, pad_token_id=0,
                    layer_norm_eps=1e-12, **LABELS)  # fmt: skip
    settings.update(overrides)
    return BertConfig(**settings)


def roberta_config(**overrides):
    settings = dict(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                    max_position_embeddings=34, type_vocab_size=1, pad_token_id=1, layer_norm_eps=1e-5,
                    **LABELS)  # fmt: skip
    settings.update(overrides)
    return RobertaConfig(**settings)


def save_source(model_class, config, folder: Path, with_tokenizer: bool = True) -> nn.Module:
    """A random model (its token-type rows and biases made non-zero, so that dropping one would show, and its
    attention peaked) and, for BERT, a WordPiece tokenizer over WORDS."""
    torch.manual_seed(0)
    model = model_class(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias") or "token_type" in name:
                parameter.normal_(0.0, 0.1)
            if name.endswith(("query.weight", "key.weight")):  # peaked attention, far from uniform
                parameter.normal_(0.0, 0.5)
            if name.endswith(("value.weight", "attention.output.dense.weight")):  # attention outputs of order 1
                parameter.normal_(0.0, 0.3)
    model.save_pretrained(folder)
    if with_tokenizer and config.model_type == "bert":
        vocab = {token: index for index, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
        BertTokenizer(vocab=vocab).save_pretrained(folder)
    return model


def convert(source: Path, output: Path, attention="learned_kernel", **options) -> Path:
    arguments = ["--model_name_or_path", str(source), "--output_dir", str(output), "--attention", attention]
    for name, value in options.items():
        arguments += [f"--{name}", str(value)]
    (args,) = convert_script.HfArgumentParser(convert_script.Arguments).parse_args_into_dataclasses(args=arguments)
    return convert_script.convert(args)


def softmax_attention(attention: luna_hf.modeling_luna_attention.LearnedKernelAttention):
    """A test-only forward for a learned-kernel attention that computes softmax attention with its own projections,
    as BERT does: with it, a converted model must compute exactly what the original computes."""

    def forward(hidden_states, token_mask, **kwargs):
        query, key, value = (
            attention.split_heads(projection(hidden_states))
            for projection in (attention.q_proj, attention.k_proj, attention.v_proj)
        )
        scores = query @ key.mT * attention.head_dim**-0.5
        scores = scores.masked_fill(token_mask[:, None, None, :] == 0, torch.finfo(scores.dtype).min)
        output = scores.softmax(dim=-1) @ value
        return attention.o_proj(output.transpose(1, 2).flatten(2)), None

    return forward


def inputs_with_padding(vocab_size, first_id, token_types: bool):
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(first_id, vocab_size, (3, 9), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0
    attention_mask[2, 4:] = 0
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if token_types:
        inputs["token_type_ids"] = (torch.arange(9) >= 4).long().expand(3, -1).clone()
    return inputs


@pytest.mark.parametrize(
    "model_class, luna_class",
    [
        (BertModel, luna_hf.LunaModel),
        (BertForMaskedLM, luna_hf.LunaForMaskedLM),
        (BertForPreTraining, luna_hf.LunaForMaskedLM),
        (BertForSequenceClassification, luna_hf.LunaForSequenceClassification),
        (BertForTokenClassification, luna_hf.LunaForTokenClassification),
        (BertForQuestionAnswering, luna_hf.LunaForQuestionAnswering),
        (BertForMultipleChoice, luna_hf.LunaForMultipleChoice),
        (RobertaModel, luna_hf.LunaModel),
        (RobertaForMaskedLM, luna_hf.LunaForMaskedLM),
        (RobertaForSequenceClassification, luna_hf.LunaForSequenceClassification),
        (RobertaForMultipleChoice, luna_hf.LunaForMultipleChoice),
    ],
)
def test_learned_kernel_with_softmax_computes_the_original(tmp_path, model_class, luna_class):
    """Every carried-over tensor (embeddings with token types and position numbering, LayerNorms, FFN, q/k/v/o, the
    head): with the learned kernel swapped for softmax, the converted model's outputs are the original's."""
    is_bert = model_class.__name__.startswith("Bert")
    config = bert_config() if is_bert else roberta_config()
    if model_class is BertForQuestionAnswering:  # start and end
        config = bert_config(id2label={0: "start", 1: "end"}, label2id={"start": 0, "end": 1})
    original = save_source(model_class, config, tmp_path / "source")
    converted = luna_class.from_pretrained(convert(tmp_path / "source", tmp_path / "luna")).eval()
    assert type(converted) is luna_class
    assert converted.config.id2label == original.config.id2label
    for layer in converted.base_model.layers:
        layer.attention.forward = softmax_attention(layer.attention)

    inputs = inputs_with_padding(original.config.vocab_size, 5 if is_bert else 3, token_types=is_bert)
    if model_class in (BertForMultipleChoice, RobertaForMultipleChoice):
        inputs = {name: tensor.unsqueeze(0).expand(2, -1, -1).contiguous() for name, tensor in inputs.items()}
    with torch.no_grad():
        expected, actual = original(**inputs), converted(**inputs)
    real = inputs["attention_mask"].bool()
    if model_class in (BertModel, RobertaModel):
        torch.testing.assert_close(actual.last_hidden_state[real], expected.last_hidden_state[real])
    elif model_class is BertForPreTraining:
        torch.testing.assert_close(actual.logits[real], expected.prediction_logits[real])
    elif model_class is BertForQuestionAnswering:
        torch.testing.assert_close(actual.start_logits[real], expected.start_logits[real])
        torch.testing.assert_close(actual.end_logits[real], expected.end_logits[real])
    elif actual.logits.dim() == 3:  # per token
        torch.testing.assert_close(actual.logits[real], expected.logits[real])
    else:
        torch.testing.assert_close(actual.logits, expected.logits)


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_embeddings_and_layers_outside_attention_are_exact(tmp_path, family):
    """Bit for bit: the embeddings (BERT's token types and 0..n-1 positions; RoBERTa's positions after the padding
    index), and each layer given the original's attention output."""
    if family == "bert":
        original = save_source(BertModel, bert_config(), tmp_path / "source")
    else:
        original = save_source(RobertaModel, roberta_config(), tmp_path / "source")
    converted = luna_hf.LunaModel.from_pretrained(convert(tmp_path / "source", tmp_path / "luna")).eval()
    inputs = inputs_with_padding(original.config.vocab_size, 5 if family == "bert" else 3, family == "bert")
    real = inputs["attention_mask"].bool()
    attention_outputs = []
    for layer in original.encoder.layer:
        layer.attention.output.dense.register_forward_hook(
            lambda module, args, output: attention_outputs.append(output)
        )
    with torch.no_grad():
        expected = original(**inputs, output_hidden_states=True).hidden_states
        token_types = {"token_type_ids": inputs["token_type_ids"]} if family == "bert" else {}
        embeddings, _ = converted.embeddings(inputs["input_ids"], None, inputs["attention_mask"], None, **token_types)
        assert torch.equal(embeddings[real], expected[0][real])
        for index, layer in enumerate(converted.layers):
            layer.attend = lambda *args, index=index, **kwargs: (attention_outputs[index], None)
            output, _ = layer(expected[index], None, inputs["attention_mask"], None)
            assert torch.equal(output[real], expected[index + 1][real])


def test_nested_conversion_loads_and_runs(tmp_path):
    save_source(BertForSequenceClassification, bert_config(), tmp_path / "source")
    folder = convert(tmp_path / "source", tmp_path / "luna", attention="nested", projected_length=4)
    model = luna_hf.LunaForSequenceClassification.from_pretrained(folder).eval()
    assert model.config.attention_type == "nested" and model.config.projected_length == 4
    assert not model.config.tie_key_value
    layer = model.luna.layers[0]
    # The unpack values are the packed context as it is; the unpack keys map BERT's values to its keys.
    assert torch.equal(layer.unpack_attention.v_proj.weight, torch.eye(32))
    source = BertForSequenceClassification.from_pretrained(tmp_path / "source")
    source_attention = source.bert.encoder.layer[0].attention.self
    tokens = torch.randn(5, 32)
    values = source_attention.value(tokens)
    torch.testing.assert_close(
        layer.unpack_attention.k_proj(values), source_attention.key(tokens), atol=1e-4, rtol=1e-4
    )
    inputs = inputs_with_padding(model.config.vocab_size, 5, token_types=True)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (3, 3) and torch.isfinite(logits).all()


def test_extended_positions_copy_the_learned_ones(tmp_path):
    original = save_source(BertModel, bert_config(), tmp_path / "source")
    folder = convert(tmp_path / "source", tmp_path / "luna", max_position_embeddings=80)
    model = luna_hf.LunaModel.from_pretrained(folder).eval()
    learned = original.embeddings.position_embeddings.weight
    positions = model.embeddings.position_embeddings.weight
    assert positions.shape == (80, 32) and model.config.max_sequence_length == 80
    assert torch.equal(positions[:32], learned) and torch.equal(positions[32:64], learned)
    assert torch.equal(positions[64:], learned[:16])
    with torch.no_grad():
        assert model(torch.randint(5, 17, (1, 70))).last_hidden_state.shape == (1, 70, 32)
    assert json.loads((folder / "tokenizer_config.json").read_text())["model_max_length"] == 80

    save_source(RobertaModel, roberta_config(), tmp_path / "roberta")
    model = luna_hf.LunaModel.from_pretrained(convert(tmp_path / "roberta", tmp_path / "luna-roberta",
                                                      max_position_embeddings=66))  # fmt: skip
    learned = RobertaModel.from_pretrained(tmp_path / "roberta").embeddings.position_embeddings.weight
    positions = model.embeddings.position_embeddings.weight
    assert torch.equal(positions[:34], learned) and torch.equal(positions[34:66], learned[2:34])
    assert model.config.max_sequence_length == 64


def test_converted_folder_loads_through_remote_code_without_luna_hf(tmp_path):
    save_source(BertForSequenceClassification, bert_config(), tmp_path / "source")
    folder = convert(tmp_path / "source", tmp_path / "luna")
    model = luna_hf.LunaForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = BertTokenizer.from_pretrained(folder)
    with torch.no_grad():
        expected = model(**tokenizer(["the film is good", "not fun"], ["very dull", "a movie"],
                                     return_tensors="pt", padding=True)).logits  # fmt: skip
    code = f"""
import json, torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
model = AutoModelForSequenceClassification.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained({str(folder)!r}, trust_remote_code=True)
inputs = tokenizer(["the film is good", "not fun"], ["very dull", "a movie"], return_tensors="pt", padding=True)
with torch.no_grad():
    logits = model(**inputs).logits
print(json.dumps({{"module": type(model).__module__, "logits": logits.tolist(), "labels": model.config.id2label}}))
"""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": "", "HF_HUB_OFFLINE": "1"}
    result = run_python(code, environment, without_luna_hf=True)
    assert not result["module"].startswith("luna_hf")
    assert result["labels"] == {"0": "negative", "1": "positive", "2": "neutral"}
    torch.testing.assert_close(torch.tensor(result["logits"]), expected)


@pytest.mark.parametrize("attention, learning_rate", [("learned_kernel", "1e-2"), ("nested", "1e-3")])
def test_attention_transfer_lowers_the_loss_and_trains_only_the_new_parameters(tmp_path, attention, learning_rate):
    save_source(BertForSequenceClassification, bert_config(), tmp_path / "source")
    folder = convert(tmp_path / "source", tmp_path / "luna", attention=attention, projected_length=4)
    generator = torch.Generator().manual_seed(2)
    lines = [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (8,), generator=generator)) for _ in range(128)]
    (tmp_path / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"{line}\t0\n" for line in lines))

    def per_layer_loss(model_dir):
        student = luna_hf.LunaForSequenceClassification.from_pretrained(model_dir)
        transfer = AttentionTransfer(student.base_model, BertModel.from_pretrained(tmp_path / "source"))
        inputs = BertTokenizer.from_pretrained(model_dir)(lines[:16], return_tensors="pt", padding=True)
        with torch.no_grad():
            return transfer(**inputs)["layer_losses"], student.state_dict()

    before, converted_state = per_layer_loss(folder)

    def transfer(destination, *extra):
        transfer_script.main([
            "--model_name_or_path", str(folder), "--teacher_name_or_path", str(tmp_path / "source"),
            "--train_file", str(tmp_path / "train.tsv"), "--transferred_model_dir", str(tmp_path / destination),
            "--output_dir", str(tmp_path / "checkpoints"), "--max_steps", "30", "--learning_rate", learning_rate,
            "--per_device_train_batch_size", "16", "--save_steps", "15", "--report_to", "none", "--seed", "0",
            "--use_cpu", "--disable_tqdm", "true", *extra,
        ])  # fmt: skip

    transfer("transferred")
    assert "attention transferred from source" in (tmp_path / "transferred" / "README.md").read_text()
    after, transferred_state = per_layer_loss(tmp_path / "transferred")
    assert (after < before).all(), (before, after)
    changed = {name for name, tensor in converted_state.items() if not torch.equal(transferred_state[name], tensor)}
    trained = {name for name in converted_state if is_transferred_parameter(name, attention)}
    assert changed and changed <= trained, changed - trained
    # Nested Luna's unpack attention takes BERT's query and output projections: copied, not new, but trained with
    # the rest of the new attention.
    new = {name for name in converted_state if is_new_attention_parameter(name, attention)}
    copied = {name for name in converted_state if re.search(r"\.unpack_attention\.[qo]_proj\.", name)}
    assert len(copied) == (8 if attention == "nested" else 0) and not copied & new, copied & new
    assert copied <= changed and trained == new | copied
    # Resumed from the middle, the run ends where the uninterrupted one did.
    transfer("resumed", "--resume_from_checkpoint", str(tmp_path / "checkpoints" / "checkpoint-15"))
    _, resumed_state = per_layer_loss(tmp_path / "resumed")
    for name in trained:
        torch.testing.assert_close(resumed_state[name], transferred_state[name])
    # ... and it did read the checkpoint: from altered weights it ends elsewhere.
    checkpoint_weights = tmp_path / "checkpoints" / "checkpoint-15" / "model.safetensors"
    weights = safetensors.torch.load_file(checkpoint_weights)
    safetensors.torch.save_file({name: tensor + 0.1 for name, tensor in weights.items()}, checkpoint_weights)
    transfer("resumed-altered", "--resume_from_checkpoint", str(tmp_path / "checkpoints" / "checkpoint-15"))
    _, altered_state = per_layer_loss(tmp_path / "resumed-altered")
    assert any(not torch.equal(altered_state[name], transferred_state[name]) for name in trained)


def test_attention_kl_transfer_is_the_divergence_of_the_weights_and_lowers_it(tmp_path):
    save_source(BertForSequenceClassification, bert_config(), tmp_path / "source")
    folder = convert(tmp_path / "source", tmp_path / "luna")
    teacher = BertModel.from_pretrained(tmp_path / "source", attn_implementation="eager")
    tokenizer = BertTokenizer.from_pretrained(folder)
    lines = [" ".join(WORDS[(3 * row + column) % len(WORDS)] for column in range(2 + row % 7)) for row in range(128)]
    (tmp_path / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"{line}\t0\n" for line in lines))
    inputs = tokenizer(lines[:8], return_tensors="pt", padding=True)
    real = inputs["attention_mask"].bool()

    def losses(model_dir):
        student = luna_hf.LunaForSequenceClassification.from_pretrained(model_dir)
        with torch.no_grad():
            return student, AttentionTransfer(student.base_model, teacher, "attention_kl")(**inputs)

    student, result = losses(folder)
    # Independently: each student layer's weights from the teacher's input of that layer, written out here.
    with torch.no_grad():
        taught = teacher(**inputs, output_hidden_states=True, output_attentions=True)
        for index, layer in enumerate(student.luna.layers):
            attention = layer.attention
            query, key = (
                projection(taught.hidden_states[index]) for projection in (attention.q_proj, attention.k_proj)
            )
            query, key = (states.unflatten(-1, (-1, attention.head_dim)).transpose(1, 2) for states in (query, key))
            scores = attention.feature_map(query) @ attention.feature_map(key).mT
            scores = scores * real[:, None, None, :]
            weights = scores / scores.sum(dim=-1, keepdim=True)
            target = taught.attentions[index]
            divergence = nn.functional.kl_div(weights.clamp(min=1e-12).log(), target, reduction="none").sum(-1)
            expected = divergence.mean(dim=1)[real].mean()
            torch.testing.assert_close(result["layer_losses"][index], expected, rtol=1e-4, atol=1e-6)
    assert (result["layer_losses"] > 0).all()

    transfer_script.main([
        "--model_name_or_path", str(folder), "--teacher_name_or_path", str(tmp_path / "source"),
        "--train_file", str(tmp_path / "train.tsv"), "--transferred_model_dir", str(tmp_path / "transferred"),
        "--output_dir", str(tmp_path / "checkpoints"), "--max_steps", "30", "--learning_rate", "1e-2",
        "--per_device_train_batch_size", "16", "--save_strategy", "no", "--report_to", "none", "--seed", "0",
        "--use_cpu", "--disable_tqdm", "true", "--transfer_loss", "attention_kl",
    ])  # fmt: skip
    _, after = losses(tmp_path / "transferred")
    assert (after["layer_losses"] < result["layer_losses"]).all(), (result["layer_losses"], after["layer_losses"])

    nested = convert(tmp_path / "source", tmp_path / "nested", attention="nested", projected_length=4)
    with pytest.raises(ValueError, match="attention_kl needs the learned-kernel attention"):
        AttentionTransfer(
            luna_hf.LunaModel.from_pretrained(nested), teacher, transfer_loss="attention_kl"
        )


def test_bad_input_is_refused_and_writes_nothing(tmp_path):
    DistilBertModel(DistilBertConfig(vocab_size=20, dim=32, n_layers=1, n_heads=4, hidden_dim=64)).save_pretrained(
        tmp_path / "distilbert"
    )
    with pytest.raises(ConversionError, match="supports BertModel, BertForMaskedLM.*RobertaModel"):
        convert(tmp_path / "distilbert", tmp_path / "out")
    assert not (tmp_path / "out").exists()

    bert_config(architectures=["BertModel"]).save_pretrained(tmp_path / "no-weights")
    with pytest.raises(ConversionError, match="has no weights"):
        convert(tmp_path / "no-weights", tmp_path / "out")

    save_source(BertModel, bert_config(), tmp_path / "source")
    with pytest.raises(ConversionError, match="below the original's 32"):
        convert(tmp_path / "source", tmp_path / "out", max_position_embeddings=16)
    assert not (tmp_path / "out").exists()

    (tmp_path / "existing").mkdir()
    with pytest.raises(ConversionError, match="exists"):
        convert(tmp_path / "source", tmp_path / "existing")

    save_source(BertModel, bert_config(vocab_size=10), tmp_path / "small-vocab")  # 17 tokens in the tokenizer
    with pytest.raises(ConversionError, match="tokenizer .* does not match the model"):
        convert(tmp_path / "small-vocab", tmp_path / "out")
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "distilbert", "existing", "no-weights", "small-vocab", "source",
    ]  # fmt: skip


def test_interrupted_conversion_leaves_no_folder(tmp_path, monkeypatch):
    save_source(BertModel, bert_config(), tmp_path / "source")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_script, "write_card", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(tmp_path / "source", tmp_path / "out")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["source"]


def test_conversion_is_seeded(tmp_path):
    save_source(BertModel, bert_config(), tmp_path / "source")
    first = luna_hf.LunaModel.from_pretrained(convert(tmp_path / "source", tmp_path / "first")).state_dict()
    second = luna_hf.LunaModel.from_pretrained(convert(tmp_path / "source", tmp_path / "second")).state_dict()
    other = luna_hf.LunaModel.from_pretrained(convert(tmp_path / "source", tmp_path / "other", seed=1)).state_dict()
    feature_maps = [name for name in first if "feature_map" in name]
    assert feature_maps and all(torch.equal(first[name], second[name]) for name in first)
    assert not all(torch.equal(first[name], other[name]) for name in feature_maps)
    wider = luna_hf.LunaModel.from_pretrained(convert(tmp_path / "source", tmp_path / "m32", kernel_num_projections=32))
    assert wider.config.kernel_num_projections == 32
    assert wider.layers[0].attention.feature_map.projection_weight.shape[0] == 32


def test_interrupted_transfer_leaves_no_folder(tmp_path, monkeypatch):
    save_source(BertModel, bert_config(), tmp_path / "source")
    model = luna_hf.LunaModel.from_pretrained(convert(tmp_path / "source", tmp_path / "luna"))
    tokenizer = BertTokenizer.from_pretrained(tmp_path / "luna")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tokenizer, "save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_folder(model, tokenizer, tmp_path / "transferred")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["luna", "source"]


def test_bfloat16_source_converts_to_float32(tmp_path):
    original = save_source(BertModel, bert_config(), tmp_path / "float32")
    original.to(torch.bfloat16).save_pretrained(tmp_path / "source")
    model = luna_hf.LunaModel.from_pretrained(convert(tmp_path / "source", tmp_path / "luna", attention="nested"))
    assert model.dtype == torch.float32
    assert torch.equal(model.embeddings.word_embeddings.weight, original.embeddings.word_embeddings.weight.float())


def test_embedding_similarity_matches_mean_pooled_cosine(tmp_path):
    """scripts/embedding_similarity.py against the cosine of mean-pooled final states computed here."""
    similarity_script = load_script("embedding_similarity")
    save_source(BertModel, bert_config(), tmp_path / "source")
    folder = convert(tmp_path / "source", tmp_path / "luna")
    sentences = ["the film is good", "a very dull movie", "not great", "fun fun fun the movie is very good"]
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\n" + "".join(f"{text}\t1\n" for text in sentences))
    output = tmp_path / "table.md"
    table = similarity_script.main(["--original", str(tmp_path / "source"), "--models", str(tmp_path / "source"),
                                    str(folder), "--sentences_file", str(tmp_path / "dev.tsv"), "--output",
                                    str(output)])  # fmt: skip

    tokenizer = BertTokenizer.from_pretrained(tmp_path / "source")
    inputs = tokenizer(sentences, return_tensors="pt", padding=True)
    weights = inputs["attention_mask"].unsqueeze(-1).float()

    def mean_pooled(model):
        with torch.no_grad():
            return (model(**inputs).last_hidden_state * weights).sum(1) / weights.sum(1)

    expected = torch.nn.functional.cosine_similarity(
        mean_pooled(BertModel.from_pretrained(tmp_path / "source").eval()),
        mean_pooled(luna_hf.LunaModel.from_pretrained(folder).eval()),
    )
    rows = {line.split("|")[1].strip(" `"): line.split("|")[2:5] for line in table.splitlines()[4:]}
    assert float(rows["source"][0]) == pytest.approx(1.0, abs=1e-4)
    mean, _, smallest = (float(cell) for cell in rows["luna"])
    assert mean == pytest.approx(expected.mean().item(), abs=1e-4) and mean < 0.999
    assert smallest == pytest.approx(expected.min().item(), abs=1e-4)
    assert output.read_text() == table
    with pytest.raises(SystemExit, match="no column 'text'"):
        similarity_script.main(["--original", str(tmp_path / "source"), "--models", str(folder), "--sentences_file",
                                str(tmp_path / "dev.tsv"), "--text_column", "text"])  # fmt: skip


def test_long_documents_reads_chunks_and_extended_positions(tmp_path):
    """scripts/long_documents.py: the chunked embedding equals the mean of each chunk's mean-pooled states computed
    one chunk at a time here (no padding), the converted model reads past the original's positions, and the table
    has one row per reading."""
    long_script = load_script("long_documents")
    save_source(BertModel, bert_config(), tmp_path / "source")
    folder = convert(tmp_path / "source", tmp_path / "luna", max_position_embeddings=80)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for index in range(10):
        words = [WORDS[i] for i in torch.randint(0, len(WORDS), (40 + 7 * index,), generator=generator)]
        rows.append({"text": " ".join(words), "label": "good" if index % 2 else "bad"})
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))

    model = BertModel.from_pretrained(tmp_path / "source").eval()
    tokenizer = BertTokenizer.from_pretrained(tmp_path / "source")
    text = rows[-1]["text"]
    embedding, tokens = long_script.embed_chunks(model, tokenizer, text, 32)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 103 and tokens == 103 + 2 * 4  # four chunks, each with [CLS] and [SEP]
    with torch.no_grad():
        expected = torch.stack([
            model(torch.tensor([[2, *ids[start : start + 30], 3]])).last_hidden_state[0].mean(0)
            for start in range(0, len(ids), 30)
        ]).mean(0)  # fmt: skip
    torch.testing.assert_close(embedding, expected, atol=1e-5, rtol=1e-5)

    luna = luna_hf.LunaModel.from_pretrained(folder).eval()
    _, read = long_script.embed_prefix(luna, tokenizer, text, 80)
    assert read == 80

    table = long_script.main(["--original", str(tmp_path / "source"), "--converted", str(folder), "--max_length",
                              "80", "--chunk_length", "32", "--documents_file", str(tmp_path / "docs.jsonl"),
                              "--folds", "2", "--output", str(tmp_path / "table.md")])  # fmt: skip
    lines = [line for line in table.splitlines() if line.startswith("| `")]
    assert [line.split("|")[2].strip() for line in lines] == [
        "first 32 tokens", "all, 32-token chunks averaged", "first 80 tokens"]  # fmt: skip
    assert (tmp_path / "table.md").read_text() == table
    with pytest.raises(SystemExit, match="fewer than --folds 6"):
        long_script.main(["--original", str(tmp_path / "source"), "--documents_file", str(tmp_path / "docs.jsonl"),
                          "--folds", "6"])  # fmt: skip


def test_the_api_converts_and_transfers_models_in_memory_with_no_script():
    """A notebook's use: convert a model object, transfer its attention on a list of texts, get per-layer losses."""
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(bert_config()).eval()
    vocab = {token: index for index, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    tokenizer = BertTokenizer(vocab=vocab)
    student = luna_hf.convert_to_luna(teacher, attention="learned_kernel", tokenizer=tokenizer,
                                      max_position_embeddings=64)  # fmt: skip
    assert type(student) is luna_hf.LunaForSequenceClassification and tokenizer.model_max_length == 64
    assert torch.equal(student.classifier.out_proj.weight, teacher.classifier.weight)
    generator = torch.Generator().manual_seed(1)
    texts = [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (8,), generator=generator)) for _ in range(48)]
    result = luna_hf.transfer_attention(student, teacher, texts, tokenizer, max_steps=12, batch_size=8,
                                        learning_rate=1e-2)  # fmt: skip
    assert result.steps == 12 and len(result.layer_losses) == 12 and len(result.layer_losses[0]) == 2
    assert sum(result.layer_losses[-1]) < sum(result.layer_losses[0])
    assert all("feature_map" in name for name in result.trained_parameters) and not student.training
    # Left an ordinary model: no hooks feeding it the teacher's states, every parameter trainable again.
    assert all(parameter.requires_grad for parameter in student.parameters())
    fresh = luna_hf.LunaForSequenceClassification(student.config).eval()
    fresh.load_state_dict(student.state_dict())
    encoded = tokenizer(texts[:3] + ["good"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(student(**encoded).logits, fresh(**encoded).logits)

    with pytest.raises(ValueError, match="texts are empty"):
        luna_hf.transfer_attention(student, teacher, ["", "  "], tokenizer)
    with pytest.raises(ValueError, match="3 texts are fewer than one batch of 16"):
        luna_hf.transfer_attention(student, teacher, texts[:3], tokenizer)


def test_the_api_refuses_what_it_cannot_convert_before_building_anything():
    from transformers import AlbertConfig, AlbertModel, GPT2Config, GPT2LMHeadModel

    albert = AlbertModel(AlbertConfig(vocab_size=30, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64, embedding_size=16))  # fmt: skip
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=30, n_embd=32, n_layer=1, n_head=4))
    relative = BertModel(bert_config(position_embedding_type="relative_key"))
    for model, message in [(albert, "AlbertModel.*supports BertModel.*not ALBERT's shared layers"),
                           (gpt2, "GPT2LMHeadModel.*not decoder-only models"),
                           (relative, "relative positions.*only 'absolute'")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            luna_hf.convert_to_luna(model)
    vocab = {token: index for index, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    with pytest.raises(ValueError, match=r"tokenizer \(17 tokens.*vocab_size 10"):
        luna_hf.convert_to_luna(BertModel(bert_config(vocab_size=10)), tokenizer=BertTokenizer(vocab=vocab))
    with pytest.raises(ValueError, match="attention must be one of"):
        luna_hf.convert_to_luna(BertModel(bert_config()), attention="softmax")


def test_general_text_is_cut_into_sentences_passages_and_pairs_that_the_transfer_reads_as_pairs(tmp_path):
    """The convert-once route: documents become the lengths sentence tasks read, and a pair is encoded as a pair task
    encodes it ([SEP] between, segment ids 1 for the second), from a list or from a text file's tab."""
    sentences = [f"Sentence number {index} is here." for index in range(40)]
    documents = [" ".join(sentences[start : start + 10]) + " Ok." for start in range(0, 40, 10)]
    texts = passages(documents, seed=3)
    kinds = {"single": 0, "passage": 0, "pair": 0}
    for text in texts:
        parts = [text] if isinstance(text, str) else list(text)
        kinds["pair" if isinstance(text, tuple) else "passage" if text.count(".") > 1 else "single"] += 1
        assert all(part.startswith("Sentence number") and part.endswith(".") for part in parts), text
    assert all(kinds.values()), kinds  # each kind is there; "Ok." (under 3 words) is not
    read = " ".join(part for text in texts for part in ([text] if isinstance(text, str) else text))
    assert "Ok" not in read
    assert all(read.count(f"number {index} ") == 1 for index in range(40))  # every sentence once, in one text
    assert passages(documents, seed=3) == texts and passages(documents, seed=4) != texts

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    tokenizer = BertTokenizer(vocab={token: index for index, token in enumerate(vocab)})
    dataset = text_dataset([WORDS[0], (WORDS[1], f"{WORDS[2]} {WORDS[3]}")], tokenizer, 16, "text")
    single, pair = dataset[0], dataset[1]
    assert single["input_ids"] == tokenizer(WORDS[0])["input_ids"] and set(single["token_type_ids"]) == {0}
    assert pair["input_ids"] == tokenizer(WORDS[1], f"{WORDS[2]} {WORDS[3]}")["input_ids"]
    assert pair["input_ids"].count(vocab.index("[SEP]")) == 2 and pair["token_type_ids"] == [0, 0, 0, 1, 1, 1]

    lines = [f"{WORDS[i % 10]}\t{WORDS[(i + 1) % 10]}" if i % 2 else WORDS[i % 10] for i in range(6)]
    (tmp_path / "texts.txt").write_text("\n".join(lines) + "\n\n")
    arguments = transfer_script.TransferArguments(
        model_name_or_path="unused", teacher_name_or_path="unused", transferred_model_dir="unused",
        train_file=str(tmp_path / "texts.txt"))  # fmt: skip
    assert transfer_script.read_texts(arguments) == [
        tuple(line.split("\t")) if "\t" in line else line for line in lines]  # fmt: skip

    # A pair task's .tsv: the two columns read as pairs, in the order given, as the finetuned model reads them.
    rows = [(f"{WORDS[i]} ?", f"{WORDS[i + 1]} .", str(i % 2)) for i in range(5)]
    (tmp_path / "pairs.tsv").write_text("label\tsentence\tquestion\n" + "".join(
        f"{label}\t{sentence}\t{question}\n" for question, sentence, label in rows))  # fmt: skip
    arguments = transfer_script.TransferArguments(
        model_name_or_path="unused", teacher_name_or_path="unused", transferred_model_dir="unused",
        train_file=str(tmp_path / "pairs.tsv"), text_column="question", text_pair_column="sentence")  # fmt: skip
    assert transfer_script.read_texts(arguments) == [(question, sentence) for question, sentence, _ in rows]
    arguments.text_pair_column = "answer"
    with pytest.raises(ValueError, match="has no column 'answer'; its columns: \\['label', 'sentence', 'question'\\]"):
        transfer_script.read_texts(arguments)
    arguments.text_pair_column, arguments.passages = "sentence", True
    with pytest.raises(ValueError, match="--passages cuts documents into passages and pairs of its own"):
        transfer_script.read_texts(arguments)
    arguments.train_file, arguments.passages = str(tmp_path / "texts.txt"), False
    with pytest.raises(ValueError, match="in a text file, a tab separates a pair"):
        transfer_script.read_texts(arguments)


def test_too_little_text_for_the_steps_asked_is_refused_before_training(tmp_path):
    torch.manual_seed(0)
    teacher = BertModel(bert_config()).eval()
    vocab = {token: index for index, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    tokenizer = BertTokenizer(vocab=vocab)
    student = luna_hf.convert_to_luna(teacher, attention="learned_kernel", tokenizer=tokenizer)
    before = {name: tensor.clone() for name, tensor in student.state_dict().items()}
    texts = [f"{WORDS[i % 10]} {WORDS[(3 * i) % 10]}" for i in range(40)]
    # 40 texts, 25 steps of 8: each text read 5 times.
    with pytest.raises(ValueError, match=r"40 texts are too few for 25 steps of 8 texts: each would be read 5 "
                                         r"times \(at most 4\)\. Give at least 50 texts, or fewer steps "
                                         r"\(max_steps <= 20\)"):  # fmt: skip
        luna_hf.transfer_attention(student, teacher, texts, tokenizer, max_steps=25, batch_size=8)
    assert all(torch.equal(tensor, before[name]) for name, tensor in student.state_dict().items())
    result = luna_hf.transfer_attention(student, teacher, texts, tokenizer, max_steps=20, batch_size=8)
    assert result.steps == 20
    (tmp_path / "empty.txt").write_text("\n  \n")
    folders = [save_luna(model, tokenizer, tmp_path / name) for model, name in [(student, "luna"), (teacher, "bert")]]
    with pytest.raises(SystemExit, match="texts are empty"):
        transfer_script.main(["--model_name_or_path", str(folders[0]), "--teacher_name_or_path", str(folders[1]),
                              "--train_file", str(tmp_path / "empty.txt"), "--transferred_model_dir",
                              str(tmp_path / "out"), "--output_dir", str(tmp_path / "ckpt"), "--use_cpu"])  # fmt: skip
    assert not (tmp_path / "out").exists()


def save_luna(model, tokenizer, folder):
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder

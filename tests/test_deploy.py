"""Deployment: torch.export (strict and not) and ONNX with dynamic batch and length, onnxruntime against eager,
torch.compile(fullgraph=True, dynamic=True), sentence-transformers, peft LoRA, half-precision inference."""

import importlib.util
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from luna_hf import (
    LunaForMaskedLM,
    LunaForMultipleChoice,
    LunaForQuestionAnswering,
    LunaForSequenceClassification,
    LunaForTokenClassification,
    LunaModel,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hub_fixture  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("export_onnx", ROOT / "scripts" / "export_onnx.py")
export_onnx = importlib.util.module_from_spec(spec)
spec.loader.exec_module(export_onnx)

onnxruntime = pytest.importorskip("onnxruntime", reason="pip install -e '.[deploy]'")
VOCAB = 64


def tiny(model_class, dynamic_projection=True, tie_key_value=True, seed=0, **overrides):
    from luna_hf import LunaConfig

    torch.manual_seed(seed)
    config = LunaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, projected_length=8, max_position_embeddings=66, num_labels=3,
                        dynamic_projection=dynamic_projection, tie_key_value=tie_key_value, **overrides)
    return model_class(config).eval()


def padded_batch(batch_size, length, seed=0, choices=None):
    """Random ids with some rows padded; lengths shorter and longer than P's 8 slots."""
    generator = torch.Generator().manual_seed(seed)
    shape = (batch_size, length) if choices is None else (batch_size, choices, length)
    input_ids = torch.randint(3, VOCAB, shape, generator=generator)
    attention_mask = torch.ones_like(input_ids)
    rows = attention_mask.view(-1, length)
    for row in range(1, rows.shape[0], 2):
        rows[row, max(1, length // (row + 1)) :] = 0
    input_ids[attention_mask == 0] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def outputs_of(model, inputs):
    with torch.no_grad():
        output = model(**inputs)
    # Traced graphs keep all l slots of P where eager may cut it: P and its mask are compared by the export tests.
    return {name: value for name, value in output.items() if not name.startswith("packed_")}


HEADS = [
    (LunaModel, True, True, "cls"), (LunaForMaskedLM, False, False, "cls"),
    (LunaForSequenceClassification, True, False, "cls"), (LunaForTokenClassification, False, True, "cls"),
    (LunaForQuestionAnswering, True, True, "cls"), (LunaForMultipleChoice, True, False, "cls"),
    (LunaForSequenceClassification, True, True, "packed_max"),
    (LunaForMultipleChoice, True, False, "packed_attention"),
]


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
@pytest.mark.parametrize("model_class, dynamic_projection, tie_key_value, classifier_pooling", HEADS)
def test_torch_export_with_dynamic_shapes_matches_eager(
    model_class, dynamic_projection, tie_key_value, classifier_pooling, strict
):
    model = tiny(model_class, dynamic_projection, tie_key_value, classifier_pooling=classifier_pooling)
    choices = 2 if model_class is LunaForMultipleChoice else None
    batch, length = torch.export.Dim("batch", min=1, max=32), torch.export.Dim("length", min=2, max=64)
    axes = {0: batch, 2: length} if choices else {0: batch, 1: length}
    example = padded_batch(2, 12, choices=choices)
    program = torch.export.export(model, (), example, dynamic_shapes={name: axes for name in example}, strict=strict)
    for batch_size, seq_length in ((5, 37), (1, 3), (3, 64)):
        inputs = padded_batch(batch_size, seq_length, seed=batch_size, choices=choices)
        expected = outputs_of(model, inputs)
        actual = program.module()(**inputs)
        for name, value in expected.items():
            torch.testing.assert_close(actual[name], value, atol=1e-4, rtol=0, msg=name)


def test_eager_still_cuts_p_to_the_longest_row():
    """Outside export/compile, dynamic projection keeps the authors' cut (min(l, longest row) slots)."""
    model = tiny(LunaModel)
    with torch.no_grad():
        output = model(**padded_batch(2, 5))
    assert output.packed_hidden_state.shape[1] == 5


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    tokenizer = hub_fixture.build_tokenizer()
    hub_fixture.save_tiny_model(LunaForSequenceClassification, root / "classifier", tokenizer, num_labels=2)
    hub_fixture.save_tiny_model(LunaModel, root / "encoder", tokenizer, dynamic_projection=False, tie_key_value=False)
    hub_fixture.save_tiny_model(LunaForMaskedLM, root / "masked", tokenizer, tie_key_value=False)
    return root, tokenizer


def run_onnx(path, inputs, output_names):
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [node.name for node in session.get_inputs()] == ["input_ids", "attention_mask"]
    return dict(zip(output_names, session.run(output_names, {k: v.numpy() for k, v in inputs.items()}), strict=True))


@pytest.mark.parametrize("folder, task, outputs", [
    ("classifier", "auto", ["logits"]),
    ("encoder", "feature-extraction", ["last_hidden_state", "pooler_output"]),
    ("masked", "auto", ["logits"]),
])
def test_export_script_round_trip_through_onnxruntime(folders, folder, task, outputs, capsys):
    root, tokenizer = folders
    output_dir = root / f"{folder}-onnx"
    worst = export_onnx.main(["--model_name_or_path", str(root / folder), "--output_dir", str(output_dir),
                              "--task", task])
    assert worst <= 1e-4 and "largest difference from PyTorch" in capsys.readouterr().out
    assert {"model.onnx", "config.json", "tokenizer", "configuration_luna.py"} <= {
        path.name for path in output_dir.iterdir()}
    model_class = {"classifier": LunaForSequenceClassification, "encoder": LunaModel, "masked": LunaForMaskedLM}[folder]
    model = model_class.from_pretrained(root / folder).eval()
    texts = ["a good film", "the movie was bad and boring and terrible", "great", "a b c d e f g h i j k l m n o p"]
    for batch in (texts, texts[:1], texts[3:]):
        encoded = tokenizer(batch, padding=True, return_tensors="pt")
        inputs = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
        expected = outputs_of(model, inputs)
        actual = run_onnx(output_dir / "model.onnx", inputs, outputs)
        for name in outputs:
            np.testing.assert_allclose(actual[name], expected[name].numpy(), atol=1e-4, rtol=0)


def test_the_exported_tokenizer_loads_where_luna_hf_is_not_installed_without_the_custom_code_question(folders):
    """A deployment box has onnxruntime and transformers: AutoTokenizer on the export's tokenizer folder must load
    the tokenizer the model was trained with, with no remote code (stdin closed: a question would fail)."""
    root, tokenizer = folders
    output_dir = root / "classifier-onnx-tokenizer"
    export_onnx.main(["--model_name_or_path", str(root / "classifier"), "--output_dir", str(output_dir)])
    result = hub_fixture.run_python(textwrap.dedent(f"""
        import json
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained({str(output_dir / "tokenizer")!r})
        print(json.dumps({{"ids": tokenizer(["a good film", "great"], padding=True)["input_ids"]}}))
    """), env=hub_fixture.clean_env(root / "hf_home", HF_HUB_OFFLINE=1), without_luna_hf=True)  # fmt: skip
    assert result["ids"] == tokenizer(["a good film", "great"], padding=True)["input_ids"]


def test_export_script_exports_the_learned_kernel_attention(tmp_path, capsys):
    hub_fixture.save_tiny_model(LunaForSequenceClassification, tmp_path / "classifier", num_labels=2,
                                attention_type="learned_kernel", kernel_shared_channels=False)
    folder, output_dir = str(tmp_path / "classifier"), str(tmp_path / "onnx")
    worst = export_onnx.main(["--model_name_or_path", folder, "--output_dir", output_dir])
    assert worst <= 1e-4 and "largest difference from PyTorch" in capsys.readouterr().out
    # Its features: no P, so the graph's outputs are the token states and the pooled output, named as such.
    export_onnx.main(["--model_name_or_path", folder, "--output_dir", str(tmp_path / "features"), "--task",
                      "feature-extraction"])  # fmt: skip
    inputs = {"input_ids": torch.tensor([[0, 5, 6, 7, 2], [0, 8, 2, 1, 1]]), "attention_mask": torch.tensor(
        [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])}  # fmt: skip
    actual = run_onnx(tmp_path / "features" / "model.onnx", inputs, ["last_hidden_state", "pooler_output"])
    with torch.no_grad():
        expected = LunaModel.from_pretrained(folder).eval()(**inputs)
    np.testing.assert_allclose(actual["pooler_output"], expected.pooler_output.numpy(), atol=1e-4, rtol=0)
    real = inputs["attention_mask"].bool().numpy()
    np.testing.assert_allclose(actual["last_hidden_state"][real], expected.last_hidden_state.numpy()[real],
                               atol=1e-4, rtol=0)  # fmt: skip


def test_export_script_bad_input(folders, tmp_path):
    root, _ = folders
    from transformers import RobertaConfig

    RobertaConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=1).save_pretrained(
        tmp_path / "roberta")
    with pytest.raises(SystemExit, match="'roberta' model, not Luna"):
        export_onnx.main(["--model_name_or_path", str(tmp_path / "roberta"), "--output_dir", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="Cannot load a model config"):
        export_onnx.main(["--model_name_or_path", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "x")])
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit, match="exists"):
        export_onnx.main(["--model_name_or_path", str(root / "classifier"), "--output_dir", str(existing)])
    assert (existing / "keep.txt").read_text() == "mine"
    with pytest.raises(SystemExit, match="Validation failed"):
        export_onnx.main(["--model_name_or_path", str(root / "classifier"), "--output_dir", str(tmp_path / "strict"),
                          "--atol", "-1"])
    assert sorted(path.name for path in tmp_path.iterdir()) == ["existing", "roberta"]
    with pytest.raises(SystemExit) as error:
        export_onnx.main(["--model_name_or_path", str(root / "classifier"), "--output_dir", str(tmp_path / "y"),
                          "--task", "summarization"])
    assert error.value.code == 2
    with pytest.raises(SystemExit, match="--task translation does not fit a 'luna' model: use --task auto"):
        export_onnx.main(["--model_name_or_path", str(root / "classifier"), "--output_dir", str(tmp_path / "y"),
                          "--task", "translation"])  # fmt: skip


def test_torch_compile_fullgraph_dynamic_inference_and_training():
    # No dropout, so that the compiled and eager training steps see the same computation.
    model = tiny(LunaForSequenceClassification, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    for batch_size, length in ((2, 16), (5, 37)):
        inputs = padded_batch(batch_size, length, seed=length)
        model.eval()
        with torch.no_grad():
            torch.testing.assert_close(compiled(**inputs).logits, model(**inputs).logits, atol=1e-4, rtol=0)
    model.train()
    labels = torch.tensor([0, 1, 2, 0, 1])
    gradients = []
    for forward in (compiled, model):
        model.zero_grad()
        forward(**inputs, labels=labels).loss.backward()
        gradients.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(gradients[0]) == len(gradients[1]) > 0
    for compiled_grad, eager_grad in zip(*gradients, strict=True):
        torch.testing.assert_close(compiled_grad, eager_grad, atol=1e-4, rtol=1e-4)


def test_sentence_transformers_batched_equals_one_by_one(folders):
    from sentence_transformers import SentenceTransformer

    root, _ = folders
    encoder = SentenceTransformer(str(root / "encoder"), trust_remote_code=True, device="cpu")
    sentences = ["a good film", "the movie was bad and boring and terrible acting", "great", "who wrote the book ?"]
    batched = encoder.encode(sentences, batch_size=4)
    alone = np.stack([encoder.encode([sentence])[0] for sentence in sentences])
    assert batched.shape == (4, 32)
    np.testing.assert_allclose(batched, alone, atol=1e-5, rtol=0)


def test_peft_lora_trains_saves_and_reloads(folders, tmp_path):
    from peft import LoraConfig, PeftModel, TaskType, get_peft_model

    root, tokenizer = folders
    base = LunaForSequenceClassification.from_pretrained(root / "classifier")
    model = get_peft_model(base, LoraConfig(task_type=TaskType.SEQ_CLS, target_modules="all-linear", r=4))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in name for name in trainable) and any("classifier" in name for name in trainable)
    encoded = tokenizer(["a good film", "great actors", "a bad film", "terrible , boring"], padding=True,
                        return_tensors="pt")
    labels = torch.tensor([1, 1, 0, 0])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(15):
        loss = model(**encoded, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    model.eval()
    with torch.no_grad():
        expected = model(**encoded).logits
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(LunaForSequenceClassification.from_pretrained(root / "classifier"),
                                         tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**encoded).logits, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 0.1), (torch.float16, 0.02)])
def test_half_precision_inference_is_finite_and_close(dtype, tolerance):
    model = tiny(LunaForMaskedLM)
    inputs = padded_batch(3, 20)
    with torch.no_grad():
        reference = model(**inputs).logits
        half = model.to(dtype)(**inputs).logits
    assert half.dtype == dtype and torch.isfinite(half).all()
    real = inputs["attention_mask"].bool()
    error = (half.float() - reference)[real].abs().max() / reference[real].abs().max()
    assert error < tolerance, error


def test_onnx_benchmark_runs_side_by_side(tmp_path):
    spec = importlib.util.spec_from_file_location("benchmark_onnx", ROOT / "scripts" / "benchmark_onnx.py")
    benchmark_onnx = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark_onnx)
    table = benchmark_onnx.main(["--lengths", "16", "48", "--size", "tiny", "--repeats", "2",
                                 "--output", str(tmp_path / "onnx.md")])
    rows = table.splitlines()[2:]
    assert [row.split("|")[1].strip() for row in rows] == ["16", "48"]
    assert all(float(row.split("|")[5]) <= 1e-4 for row in rows)
    assert (tmp_path / "onnx.md").read_text().endswith(table + "\n")


PRE_LN_LEARNED = dict(normalize_before=True, tie_key_value=False, position_embedding_type="learned",
                      dynamic_projection=False)


# P longer than the traced sources (the eager encoder cuts it, the exported one keeps all l slots), and as long.
@pytest.mark.parametrize("variant", [dict(projected_length=12), PRE_LN_LEARNED])
def test_the_translation_model_exports_with_its_cache_as_explicit_tensors(tmp_path, variant):
    """Encoder, first decoding step and later steps as three ONNX graphs (the cache in and out as tensors); in
    onnxruntime, on a batch and source length other than the traced ones: every step's logits and the greedy tokens
    are eager PyTorch's (its forward on the whole prefix, and generate())."""
    from luna_hf import LunaForConditionalGeneration, LunaSeq2SeqConfig
    from luna_hf.onnx_export import export_translation_to_onnx, greedy_translate

    torch.manual_seed(0)
    config = LunaSeq2SeqConfig(**{**dict(vocab_size=30, hidden_size=16, encoder_layers=2, decoder_layers=2,
                                         num_attention_heads=2, intermediate_size=32, projected_length=4,
                                         max_position_embeddings=40, hidden_dropout_prob=0.0), **variant})  # fmt: skip
    model = LunaForConditionalGeneration(config).eval()
    with torch.no_grad():  # away from the initial LayerNorms and zero biases, so that a misplaced one shows
        for name, parameter in model.named_parameters():
            if "bias" in name or "norm" in name:
                parameter.add_(0.3 * torch.randn_like(parameter))

    def source(batch, length, seed):
        ids = torch.randint(3, 30, (batch, length), generator=torch.Generator().manual_seed(seed))
        mask = torch.ones_like(ids)
        for row in range(1, batch):  # left padding, as the tokenizer of a translation model pads
            ids[row, : 2 * row], mask[row, : 2 * row] = config.pad_token_id, 0
        return ids, mask

    traced_ids, traced_mask = source(2, 7, seed=1)
    paths = export_translation_to_onnx(model, {"input_ids": traced_ids, "attention_mask": traced_mask}, tmp_path)
    sessions = {name: onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                for name, path in paths.items()}  # fmt: skip
    ids, mask = source(3, 9, seed=2)
    target = torch.randint(3, 30, (3, 8), generator=torch.Generator().manual_seed(3))
    decoder_input_ids = torch.cat([torch.full((3, 1), config.decoder_start_token_id), target[:, :-1]], dim=1)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_input_ids).logits
        generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, num_beams=1,
                                   do_sample=False)[:, 1:]  # fmt: skip
    _, scores = greedy_translate(sessions, ids.numpy(), mask.numpy(), config, 0, forced_tokens=target.numpy())
    np.testing.assert_allclose(scores, expected.numpy(), atol=1e-4, rtol=0)  # teacher-forced: every step's logits
    tokens, _ = greedy_translate(sessions, ids.numpy(), mask.numpy(), config, max_new_tokens=10)
    np.testing.assert_array_equal(tokens, generated.numpy()[:, : tokens.shape[1]])
    assert tokens.shape[1] == generated.shape[1] or (tokens[:, -1] == config.eos_token_id).any()


def test_export_script_writes_the_translation_graphs_and_checks_them(folders, tmp_path, capsys):
    from luna_hf import LunaForConditionalGeneration, LunaSeq2SeqConfig

    _, tokenizer = folders
    torch.manual_seed(0)
    config = LunaSeq2SeqConfig(vocab_size=len(tokenizer), hidden_size=16, encoder_layers=1, decoder_layers=2,
                               num_attention_heads=2, intermediate_size=32, projected_length=4,
                               max_position_embeddings=64, pad_token_id=1, eos_token_id=2, bos_token_id=0,
                               decoder_start_token_id=2)  # fmt: skip
    LunaForConditionalGeneration(config).save_pretrained(tmp_path / "translation")
    tokenizer.save_pretrained(tmp_path / "translation")
    output_dir = tmp_path / "translation-onnx"
    worst = export_onnx.main(["--model_name_or_path", str(tmp_path / "translation"), "--output_dir", str(output_dir)])
    assert worst <= 1e-4 and "decoder_with_past_model.onnx" in capsys.readouterr().out
    names = {path.name for path in output_dir.iterdir()}
    assert {"encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx", "config.json"} <= names
    with pytest.raises(SystemExit, match="--task fill-mask does not fit a 'luna_seq2seq' model"):
        export_onnx.main(["--model_name_or_path", str(tmp_path / "translation"), "--output_dir", str(tmp_path / "x"),
                          "--task", "fill-mask"])  # fmt: skip

"""scripts/run_translation.py on a tiny English-German JSON-lines corpus written by the test: new Marian and BART models
(with a BPE trained on the training split) for a few steps, generation, sacreBLEU/chrF in the results file, reuse of
the saved folder, and bad input."""

import importlib.util
import json
import logging
from pathlib import Path

import datasets
import pytest
from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer

import luna_hf  # noqa: F401  (registers Luna's models)

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "run_translation.py"
WORDS = [("file", "Datei"), ("folder", "Ordner"), ("user", "Benutzer"), ("key", "Schlüssel"), ("disk", "Festplatte")]
STATES = [("not found", "nicht gefunden"), ("saved", "gespeichert"), ("deleted", "gelöscht"), ("open", "offen")]


def load_script():
    spec = importlib.util.spec_from_file_location("run_translation", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_jsonl(path: Path, pairs) -> str:
    path.write_text("".join(json.dumps({"translation": {"en": en, "de": de}}, ensure_ascii=False) + "\n"
                            for en, de in pairs), encoding="utf-8")  # fmt: skip
    return str(path)


@pytest.fixture
def corpus(tmp_path):
    pairs = [(f"The {en} %s is {state}.", f"{de} %s ist {zustand}.") for en, de in WORDS for state, zustand in STATES]
    return {
        "train": write_jsonl(tmp_path / "train.json", pairs + [("", "leer"), ("Empty target", " ")]),
        "validation": write_jsonl(tmp_path / "validation.json", pairs[:6]),
        "test": write_jsonl(tmp_path / "test.json", pairs[6:11]),
    }


TINY = ["--d_model", "32", "--layers", "1", "--heads", "2", "--ffn_dim", "64", "--vocab_size", "300",
        "--max_source_length", "24", "--max_target_length", "24", "--per_device_train_batch_size", "8",
        "--per_device_eval_batch_size", "8", "--report_to", "none", "--save_strategy", "no", "--use_cpu",
        "--disable_tqdm", "true"]  # fmt: skip


def run(corpus, output_dir, *extra):
    files = ["--train_file", corpus["train"], "--validation_file", corpus["validation"], "--test_file", corpus["test"]]
    return load_script().main([*files, "--output_dir", str(output_dir), *TINY, *extra])


LUNA_LANDED = "luna_seq2seq" in CONFIG_MAPPING


@pytest.mark.parametrize(
    "model_type",
    ["marian", "bart", pytest.param("luna", marks=pytest.mark.skipif(not LUNA_LANDED, reason="no Luna seq2seq yet"))],
)
def test_new_model_trains_generates_and_scores(corpus, tmp_path, model_type, caplog):
    output_dir = tmp_path / model_type
    with caplog.at_level(logging.WARNING):
        results = run(corpus, output_dir, "--model_type", model_type, "--do_train", "--do_eval", "--do_predict",
                      "--predict_with_generate", "--max_steps", "3", "--num_beams", "2", "--projected_length",
                      "4")  # fmt: skip
    model_type = load_script().MODEL_TYPE_ALIASES.get(model_type, model_type)
    assert any("skipped 2 rows with an empty source or target" in r.getMessage() for r in caplog.records)
    saved = json.loads((output_dir / "translation_results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert results["train_samples"] == 20 and results["model_type"] == model_type
    for key in ("eval_bleu", "eval_chrf", "predict_bleu", "predict_chrf"):
        assert 0.0 <= saved[key] <= 100.0
    assert saved["wall_time_seconds"] > 0 and "train.json" in saved["data_source"]
    assert "sacrebleu" in saved["metric_backend"]
    predictions = [json.loads(line) for line in (output_dir / "predict_predictions.jsonl").open()]
    sources = [json.loads(line)["translation"]["en"] for line in open(corpus["test"])]
    assert [p["source"] for p in predictions] == sources
    assert all(isinstance(p["prediction"], str) for p in predictions)
    assert not list(output_dir.glob("*.partial")) and not (output_dir / "final.partial").exists()

    # The folder holds a model and its tokenizer that agree, with the special tokens the config names.
    config, tokenizer = AutoConfig.from_pretrained(output_dir), AutoTokenizer.from_pretrained(output_dir)
    assert config.model_type == model_type and config.vocab_size == len(tokenizer)
    sizes = {"d_model": 32, "layers": 1, "heads": 2, "ffn_dim": 64, "projected_length": 4}
    for argument, fields in load_script().SIZE_FIELDS[model_type].items():
        assert [getattr(config, name) for name in fields] == [sizes[argument]] * len(fields)
    assert (config.pad_token_id, config.eos_token_id) == (tokenizer.pad_token_id, tokenizer.eos_token_id)
    ids = tokenizer("The file %s is open.")["input_ids"]
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True).strip() == "The file %s is open."
    model = AutoModelForSeq2SeqLM.from_pretrained(output_dir)
    if model_type != "luna_seq2seq":
        assert model.config._attn_implementation == "sdpa"

    # The saved folder is a --model_name_or_path for prediction only.
    again = run(corpus, tmp_path / "reuse", "--model_name_or_path", str(output_dir), "--do_predict",
                "--predict_with_generate", "--num_beams", "2")  # fmt: skip
    assert again["predict_bleu"] == saved["predict_bleu"] and again["predict_chrf"] == saved["predict_chrf"]


def test_bad_input_is_a_clear_error(corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(SystemExit, match=r"--source_lang fr is not in the train data; its languages are \['de', 'en'"):
        run(corpus, tmp_path / "a", "--model_type", "marian", "--do_train", "--source_lang", "fr")
    with pytest.raises(SystemExit):
        run({**corpus, "test": str(tmp_path / "absent.json")}, tmp_path / "b", "--model_type", "marian", "--do_predict")
    assert "absent.json does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run(corpus, tmp_path / "c", "--model_type", "transformer", "--do_train")
    assert "choose one of ['bart', 'luna_seq2seq', 'marian'] or luna" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run(corpus, tmp_path / "d", "--do_train")
    assert "exactly one of --model_name_or_path" in capsys.readouterr().err

    with pytest.raises(SystemExit, match="could not be loaded .* scripts/prepare_parallel_corpus.py"):
        load_script().main(["--dataset_name", "wmt14", "--dataset_config_name", "de-en", "--model_type", "marian",
                            "--output_dir", str(tmp_path / "hub"), "--do_train"])  # fmt: skip

    model_dir = tmp_path / "model"
    run(corpus, model_dir, "--model_type", "marian", "--do_train", "--max_steps", "1")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    size = len(tokenizer)
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(5)])
    tokenizer.save_pretrained(tmp_path / "bigger-tokenizer")
    with pytest.raises(SystemExit, match=rf"has {size + 5} tokens but the model .* embeds only {size}"):
        run(corpus, tmp_path / "e", "--model_name_or_path", str(model_dir), "--tokenizer_name",
            str(tmp_path / "bigger-tokenizer"), "--do_predict")  # fmt: skip


def test_model_learns_the_pairs_and_metrics_match_sacrebleu(corpus, tmp_path):
    import sacrebleu

    module = load_script()
    # 200 steps on the 20 training pairs, evaluated on 6 of them: the model has learnt them, placeholders included.
    results = module.main([
        "--train_file", corpus["train"], "--validation_file", corpus["validation"], "--output_dir",
        str(tmp_path / "model"), *TINY, "--d_model", "64", "--ffn_dim", "128", "--vocab_size", "400",
        "--per_device_train_batch_size", "20", "--learning_rate", "3e-3", "--max_steps", "200", "--model_type",
        "marian", "--do_train", "--do_eval", "--predict_with_generate",
    ])  # fmt: skip
    predictions = [json.loads(line) for line in (tmp_path / "model" / "eval_predictions.jsonl").open()]
    assert results["eval_bleu"] > 30 and results["eval_chrf"] > 40, predictions
    assert sum("%s" in p["prediction"] for p in predictions) >= 5

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    metrics = module.TranslationMetrics(tokenizer)
    hypotheses, references = [p["prediction"] for p in predictions], [p["reference"] for p in predictions]
    expected = sacrebleu.corpus_bleu(hypotheses, [references]), sacrebleu.corpus_chrf(hypotheses, [references])
    assert (results["eval_bleu"], results["eval_chrf"]) == (round(expected[0].score, 2), round(expected[1].score, 2))
    assert metrics.score(references, references) == {"bleu": 100.0, "chrf": 100.0}
    ids = tokenizer(references, padding=True)["input_ids"]
    ids[1] = [-100 if token == tokenizer.pad_token_id else token for token in ids[1]]  # label padding
    assert metrics.decode(ids) == references


def test_generation_settings_are_the_users(corpus, tmp_path):
    script = load_script()
    files = ["--train_file", corpus["train"], "--output_dir", str(tmp_path), "--model_type", "marian"]
    _, _, args = script.parse_args(files)
    assert (args.generation_num_beams, args.generation_max_length) == (1, 128)
    _, _, args = script.parse_args([*files, "--generation_num_beams", "4", "--generation_max_length", "200"])
    assert (args.generation_num_beams, args.generation_max_length) == (4, 200)
    _, _, args = script.parse_args([*files, "--num_beams", "3", "--max_target_length", "64"])
    assert (args.generation_num_beams, args.generation_max_length) == (3, 64)
    with pytest.raises(SystemExit):
        script.parse_args([*files, "--num_beams", "3", "--generation_num_beams", "4"])


def test_predictions_come_back_in_dataset_order_when_training_groups_by_length(corpus, tmp_path):
    """The Trainer also groups evaluation batches by length with this flag; the script pairs predictions with their
    references by position, so its evaluation must stay sequential."""
    from torch.utils.data import SequentialSampler

    script = load_script()
    grouped = ["--model_type", "marian", "--use_cpu", "--train_sampling_strategy", "group_by_length"]
    _, _, args = script.parse_args(["--train_file", corpus["train"], "--output_dir", str(tmp_path), *grouped])
    model = AutoModelForSeq2SeqLM.from_config(AutoConfig.for_model("marian", vocab_size=50, pad_token_id=1, d_model=8,
        encoder_layers=1, decoder_layers=1, encoder_attention_heads=1, decoder_attention_heads=1,
        encoder_ffn_dim=8, decoder_ffn_dim=8))  # fmt: skip
    dataset = datasets.Dataset.from_dict({"input_ids": [[5] * n for n in (3, 9, 1, 7, 2, 8)]})
    trainer = script.TranslationTrainer(model=model, args=args)
    assert isinstance(trainer._get_eval_sampler(dataset), SequentialSampler)

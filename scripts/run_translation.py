#!/usr/bin/env python
"""Train and evaluate a translation model with Seq2SeqTrainer: transformers' examples/pytorch/translation
run_translation.py, shortened, plus training from scratch.

Data: JSON lines `{"translation": {"en": ..., "de": ...}}` (`--train_file/--validation_file/--test_file`, e.g. from
scripts/prepare_parallel_corpus.py), or a Hub dataset (`--dataset_name wmt14 --dataset_config_name de-en`) when the
Hub is reachable. Rows with an empty source or target are skipped and counted.

Model: an existing seq2seq folder (`--model_name_or_path DIR`), or a new one of `--model_type` (`marian` or `bart`,
the Transformer baselines with SDPA attention; `luna` for Luna's encoder-decoder, model type `luna_seq2seq`) sized by
`--d_model --layers --heads --ffn_dim` (and `--projected_length` for Luna), mapped onto each config's fields in
`SIZE_FIELDS`. A new model gets a new tokenizer: byte-level BPE trained on the training split's source and target
text (shared vocabulary, `--vocab_size`), unless `--tokenizer_name DIR` names one; it is saved with the model.

Metrics: sacreBLEU and chrF (`evaluate`'s `sacrebleu` and `chrf` metrics when they load; offline, `evaluate` cannot
fetch their scripts from the Hub, and the same sacrebleu calls are made directly), written with the wall time and the
data source to OUTPUT_DIR/translation_results.json, the predictions to OUTPUT_DIR/{eval,predict}_predictions.jsonl.

    python scripts/run_translation.py --model_type marian --train_file data/parallel/debian-en-de/train.json \\
        --validation_file data/parallel/debian-en-de/validation.json --test_file data/parallel/debian-en-de/test.json \\
        --source_lang en --target_lang de --output_dir outputs/translation-marian --do_train --do_eval --do_predict \\
        --predict_with_generate
"""

import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import transformers
from datasets import load_dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from torch.utils.data import SequentialSampler
from transformers import (
    AutoConfig,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    HfArgumentParser,
    PreTrainedTokenizerFast,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    set_seed,
)
from transformers.trainer_utils import has_length

import luna_hf  # noqa: F401  (registers Luna with the Auto classes)

logger = logging.getLogger("run_translation")

# --model_type's size arguments -> the fields of its config.
SIZE_FIELDS = {
    "marian": {"d_model": ["d_model"], "layers": ["encoder_layers", "decoder_layers"],
               "heads": ["encoder_attention_heads", "decoder_attention_heads"],
               "ffn_dim": ["encoder_ffn_dim", "decoder_ffn_dim"]},
    "luna_seq2seq": {"d_model": ["hidden_size"], "layers": ["encoder_layers", "decoder_layers"],
                     "heads": ["num_attention_heads"], "ffn_dim": ["intermediate_size"],
                     "projected_length": ["projected_length"]},
}  # fmt: skip
SIZE_FIELDS["bart"] = SIZE_FIELDS["marian"]
MODEL_TYPE_ALIASES = {"luna": "luna_seq2seq"}
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "An existing seq2seq model folder."})
    model_type: str | None = field(
        default=None, metadata={"help": f"Train a new model of this type: {sorted(SIZE_FIELDS)} or luna."}
    )
    tokenizer_name: str | None = field(default=None, metadata={"help": "A tokenizer folder, if not the model's."})
    d_model: int = field(default=256, metadata={"help": "New model: hidden size."})
    layers: int = field(default=3, metadata={"help": "New model: encoder layers, and as many decoder layers."})
    heads: int = field(default=4, metadata={"help": "New model: attention heads."})
    ffn_dim: int = field(default=1024, metadata={"help": "New model: feed-forward width."})
    projected_length: int = field(default=16, metadata={"help": "New Luna model: packed length l."})
    vocab_size: int = field(default=8000, metadata={"help": "New tokenizer: shared source/target BPE vocabulary."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where datasets and models are cached."})


@dataclass
class DataTrainingArguments:
    source_lang: str = field(default="en", metadata={"help": "Source language key in the `translation` rows."})
    target_lang: str = field(default="de", metadata={"help": "Target language key."})
    dataset_name: str | None = field(default=None, metadata={"help": "A Hub dataset (e.g. wmt14)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Its configuration (e.g. de-en)."})
    train_file: str | None = field(default=None, metadata={"help": "Training data, JSON lines."})
    validation_file: str | None = field(default=None, metadata={"help": "Validation data, JSON lines."})
    test_file: str | None = field(default=None, metadata={"help": "Test data, JSON lines."})
    max_source_length: int = field(default=128, metadata={"help": "Source tokens kept (longer are truncated)."})
    max_target_length: int = field(
        default=128, metadata={"help": "Target tokens kept; also generate()'s limit unless --generation_max_length."}
    )
    num_beams: int | None = field(
        default=None, metadata={"help": "Beams for generate() in evaluation and prediction (default 1)."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only this many training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only this many validation rows."})
    max_predict_samples: int | None = field(default=None, metadata={"help": "Keep only this many test rows."})


def parse_args(argv):
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, Seq2SeqTrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(argv)
    if (model_args.model_name_or_path is None) == (model_args.model_type is None):
        parser.error("give exactly one of --model_name_or_path DIR (an existing model) or --model_type TYPE (new)")
    if model_args.model_type:
        model_args.model_type = MODEL_TYPE_ALIASES.get(model_args.model_type, model_args.model_type)
        if model_args.model_type not in SIZE_FIELDS:
            parser.error(f"--model_type {model_args.model_type}: choose one of {sorted(SIZE_FIELDS)} or luna")
    files = [data_args.train_file, data_args.validation_file, data_args.test_file]
    if data_args.dataset_name is None and not any(files):
        parser.error("give --train_file/--validation_file/--test_file (JSON lines) or --dataset_name")
    for path in filter(None, files):
        if not Path(path).is_file():
            parser.error(f"{path} does not exist; build a corpus with scripts/prepare_parallel_corpus.py")
    if data_args.source_lang == data_args.target_lang:
        parser.error("--source_lang and --target_lang are the same")
    # --num_beams is this script's name for Seq2SeqTrainingArguments' --generation_num_beams: either may be given
    if None not in (data_args.num_beams, training_args.generation_num_beams) and \
            data_args.num_beams != training_args.generation_num_beams:
        parser.error(f"--num_beams {data_args.num_beams} and --generation_num_beams "
                     f"{training_args.generation_num_beams} disagree: give one of them")
    training_args.generation_num_beams = data_args.num_beams or training_args.generation_num_beams or 1
    training_args.generation_max_length = training_args.generation_max_length or data_args.max_target_length
    return model_args, data_args, training_args


def load_raw(data_args, model_args) -> tuple[datasets.DatasetDict, str]:
    """The splits, with empty rows dropped, and a description of where they came from."""
    if data_args.dataset_name:
        try:
            raw = load_dataset(data_args.dataset_name, data_args.dataset_config_name, cache_dir=model_args.cache_dir)
        except Exception as error:
            sys.exit(f"error: {data_args.dataset_name} could not be loaded ({type(error).__name__}: {error}); "
                     "offline, build one with scripts/prepare_parallel_corpus.py and pass --train_file")  # fmt: skip
        source = f"{data_args.dataset_name} ({data_args.dataset_config_name}) from the Hub"
    else:
        files = {"train": data_args.train_file, "validation": data_args.validation_file, "test": data_args.test_file}
        files = {split: path for split, path in files.items() if path}
        raw = load_dataset("json", data_files=files, cache_dir=model_args.cache_dir)
        source = ", ".join(f"{split}: {path}" for split, path in files.items())
    src, tgt = data_args.source_lang, data_args.target_lang
    limits = {"train": data_args.max_train_samples, "validation": data_args.max_eval_samples,
              "test": data_args.max_predict_samples}  # fmt: skip
    for split in list(raw):
        if "translation" not in raw[split].column_names or len(raw[split]) == 0:
            sys.exit(f"error: the {split} split has no rows of the form {{\"translation\": {{\"{src}\": ..., "
                     f"\"{tgt}\": ...}}}} (columns: {raw[split].column_names})")  # fmt: skip
        languages = set(raw[split][0]["translation"])
        for lang, option in ((src, "--source_lang"), (tgt, "--target_lang")):
            if lang not in languages:
                sys.exit(f"error: {option} {lang} is not in the {split} data; its languages are {sorted(languages)}")
        before = len(raw[split])
        raw[split] = raw[split].filter(
            lambda row: bool((row["translation"][src] or "").strip() and (row["translation"][tgt] or "").strip()),
            desc=f"Dropping empty {split} rows",
        )
        if len(raw[split]) < before:
            logger.warning(f"{split}: skipped {before - len(raw[split])} rows with an empty source or target")
        if limits.get(split) is not None:
            raw[split] = raw[split].select(range(min(limits[split], len(raw[split]))))
    return raw, source


def train_tokenizer(raw, data_args, model_args, max_length: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE shared by source and target, trained on the training split; every sequence ends in </s>."""
    if "train" not in raw:
        sys.exit("error: a new model needs --tokenizer_name DIR or a training split to train its tokenizer on")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=model_args.vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=True,
    )  # fmt: skip
    pairs = raw["train"]["translation"]
    texts = (pair[lang] for pair in pairs for lang in (data_args.source_lang, data_args.target_lang))
    tokenizer.train_from_iterator(texts, trainer, length=2 * len(pairs))
    eos = tokenizer.token_to_id(SPECIAL_TOKENS["eos_token"])
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", eos)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=max_length, **SPECIAL_TOKENS)


def new_model(model_args, tokenizer, max_length: int):
    """A model of --model_type sized by the size arguments, its vocabulary and special tokens from the tokenizer."""
    try:
        config = AutoConfig.for_model(model_args.model_type)
    except ValueError:
        sys.exit(f"error: model type {model_args.model_type} is not registered with transformers (is luna_hf "
                 "recent enough to have it?)")  # fmt: skip
    for argument, names in SIZE_FIELDS[model_args.model_type].items():
        for name in names:
            setattr(config, name, getattr(model_args, argument))
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in SPECIAL_TOKENS.items()}
    config.vocab_size = len(tokenizer)
    if hasattr(config, "decoder_vocab_size"):  # Marian
        config.decoder_vocab_size = len(tokenizer)
    config.max_position_embeddings = max_length
    config.pad_token_id, config.bos_token_id, config.eos_token_id = ids["pad_token"], ids["bos_token"], ids["eos_token"]
    config.decoder_start_token_id = ids["eos_token"]  # fairseq's and BART's: the target starts with </s>
    if hasattr(type(config), "forced_eos_token_id"):  # Marian's (0) and BART's defaults; generation_config's below
        config.forced_eos_token_id = ids["eos_token"]
    attention = {} if model_args.model_type == "luna_seq2seq" else {"attn_implementation": "sdpa"}
    model = AutoModelForSeq2SeqLM.from_config(config, **attention)
    generation = model.generation_config
    generation.pad_token_id, generation.bos_token_id = ids["pad_token"], ids["bos_token"]
    generation.eos_token_id = generation.forced_eos_token_id = generation.decoder_start_token_id = ids["eos_token"]
    generation.forced_bos_token_id = None
    return model


def load_model_and_tokenizer(raw, model_args, data_args):
    max_length = max(data_args.max_source_length, data_args.max_target_length)
    if model_args.tokenizer_name or model_args.model_name_or_path:
        tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path)
    else:
        tokenizer = train_tokenizer(raw, data_args, model_args, max_length)
    if model_args.model_type:
        return new_model(model_args, tokenizer, max_length), tokenizer
    model = AutoModelForSeq2SeqLM.from_pretrained(model_args.model_name_or_path, cache_dir=model_args.cache_dir)
    vocab = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab:
        sys.exit(f"error: the tokenizer ({model_args.tokenizer_name or model_args.model_name_or_path}) has "
                 f"{len(tokenizer)} tokens but the model ({model_args.model_name_or_path}) embeds only {vocab}; use "
                 "the tokenizer the model was trained with")  # fmt: skip
    if model.config.decoder_start_token_id is None:
        sys.exit(f"error: {model_args.model_name_or_path}'s config has no decoder_start_token_id; set it")
    return model, tokenizer


def tokenize(raw, tokenizer, data_args, training_args):
    src, tgt = data_args.source_lang, data_args.target_lang

    def encode(batch):
        inputs = tokenizer([p[src] for p in batch["translation"]], max_length=data_args.max_source_length,
                           truncation=True)  # fmt: skip
        targets = tokenizer(text_target=[p[tgt] for p in batch["translation"]],
                            max_length=data_args.max_target_length, truncation=True)  # fmt: skip
        return {**inputs, "labels": targets["input_ids"]}

    with training_args.main_process_first(desc="tokenization"):
        return {split: raw[split].map(encode, batched=True, remove_columns=raw[split].column_names,
                                      desc=f"Tokenizing {split}") for split in raw}  # fmt: skip


class TranslationMetrics:
    """sacreBLEU and chrF: through `evaluate` when its metric scripts load, else sacrebleu's own identical calls."""

    def __init__(self, tokenizer, cache_dir=None):
        self.tokenizer = tokenizer
        try:
            import evaluate

            self.bleu, self.chrf = evaluate.load("sacrebleu", cache_dir=cache_dir), evaluate.load("chrf")
            self.backend = f"evaluate {evaluate.__version__} (sacrebleu, chrf)"
        except Exception:  # offline: evaluate cannot fetch the metric scripts from the Hub
            try:
                import sacrebleu
            except ImportError:
                sys.exit("error: BLEU needs sacrebleu: pip install sacrebleu (or pip install -e '.[dev]')")
            self.bleu = self.chrf = None
            self.backend = f"sacrebleu {sacrebleu.__version__} (corpus_bleu, corpus_chrf; evaluate's metrics offline)"

    def decode(self, ids) -> list[str]:
        ids = np.where(np.asarray(ids) < 0, self.tokenizer.pad_token_id, ids)  # -100 padding of labels/predictions
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return [text.strip() for text in texts]

    def score(self, predictions: list[str], references: list[str]) -> dict:
        if self.bleu is None:
            import sacrebleu

            bleu = sacrebleu.corpus_bleu(predictions, [references]).score
            chrf = sacrebleu.corpus_chrf(predictions, [references]).score
        else:
            wrapped = [[reference] for reference in references]
            bleu = self.bleu.compute(predictions=predictions, references=wrapped)["score"]
            chrf = self.chrf.compute(predictions=predictions, references=wrapped)["score"]
        return {"bleu": round(bleu, 2), "chrf": round(chrf, 2)}

    def __call__(self, eval_prediction) -> dict:
        predictions, labels = eval_prediction
        predictions = predictions[0] if isinstance(predictions, tuple) else predictions
        return self.score(self.decode(predictions), self.decode(labels))


class TranslationTrainer(Seq2SeqTrainer):
    """Evaluates and predicts in dataset order even when training groups by length (`--train_sampling_strategy
    group_by_length`, which the Trainer also applies to evaluation): predictions are paired with their untruncated
    references by position."""

    def _get_eval_sampler(self, eval_dataset):
        if eval_dataset is None or not has_length(eval_dataset):
            return None
        return SequentialSampler(eval_dataset) if self.args.world_size <= 1 else None


def write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def evaluate_split(trainer, metrics, raw_split, encoded_split, split, data_args, output_dir) -> dict:
    """generate() translations of a split, scored and written next to their sources and references."""
    prefix = "eval" if split == "validation" else "predict"
    output = trainer.predict(encoded_split, metric_key_prefix=prefix)
    results = dict(output.metrics)
    if trainer.args.predict_with_generate:  # scored against the untruncated references
        predictions = metrics.decode(output.predictions)
        references = [pair[data_args.target_lang].strip() for pair in raw_split["translation"]]
        results.update({f"{prefix}_{name}": value for name, value in metrics.score(predictions, references).items()})
        rows = [{"source": pair[data_args.source_lang], "reference": pair[data_args.target_lang], "prediction": text}
                for pair, text in zip(raw_split["translation"], predictions, strict=True)]  # fmt: skip
        if trainer.is_world_process_zero():
            write_atomically(output_dir / f"{prefix}_predictions.jsonl",
                             "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))  # fmt: skip
    trainer.log_metrics(prefix, results)
    return results


def save_model(trainer, output_dir: Path) -> None:
    """The model and tokenizer, saved into a temporary folder whose files are then moved into OUTPUT_DIR."""
    partial = output_dir / "final.partial"
    shutil.rmtree(partial, ignore_errors=True)
    trainer.save_model(str(partial))
    for path in partial.iterdir():
        os.replace(path, output_dir / path.name)
    partial.rmdir()


def main(argv=None):
    model_args, data_args, training_args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stdout)], level=logging.INFO)  # fmt: skip
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    set_seed(training_args.seed)
    start, output_dir = time.time(), Path(training_args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    # Data
    raw, data_source = load_raw(data_args, model_args)
    needed = {"train": training_args.do_train, "validation": training_args.do_eval, "test": training_args.do_predict}
    for split, wanted in needed.items():
        if wanted and split not in raw:
            sys.exit(f"error: --do_{ {'train': 'train', 'validation': 'eval', 'test': 'predict'}[split] } needs a "
                     f"{split} split (--{split}_file)")  # fmt: skip

    # Model
    model, tokenizer = load_model_and_tokenizer(raw, model_args, data_args)
    logger.info(f"{model.config.model_type}: {model.num_parameters() / 1e6:.2f} M parameters, "
                f"vocabulary {len(tokenizer)}; data: {data_source}")  # fmt: skip
    encoded = tokenize(raw, tokenizer, data_args, training_args)

    # Train
    metrics = TranslationMetrics(tokenizer, model_args.cache_dir)
    trainer = TranslationTrainer(
        model=model, args=training_args, processing_class=tokenizer,
        train_dataset=encoded.get("train") if training_args.do_train else None,
        eval_dataset=encoded.get("validation") if training_args.do_eval else None,
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100),
        compute_metrics=metrics if training_args.predict_with_generate else None,
    )  # fmt: skip
    results = {}
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        results.update(train_result.metrics, train_samples=len(encoded["train"]))
        save_model(trainer, output_dir)
    for split in ("validation", "test"):
        if needed[split]:
            results.update(evaluate_split(trainer, metrics, raw[split], encoded[split], split, data_args, output_dir))

    # Save
    if trainer.is_world_process_zero():
        results.update(data_source=data_source, metric_backend=metrics.backend, model_type=model.config.model_type,
                       wall_time_seconds=round(time.time() - start, 1))  # fmt: skip
        write_atomically(output_dir / "translation_results.json", json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()

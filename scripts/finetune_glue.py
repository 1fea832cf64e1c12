#!/usr/bin/env python
"""Finetune Luna (or RoBERTa, BERT, ...) on a GLUE task or on your own sentence(-pair) classification files.

Shaped like transformers' `examples/pytorch/text-classification/run_glue.py`, with its argument names, plus local
GLUE folders, the paper's finetuning recipe, early stopping, readable labels, and a model card when pushing:

    python scripts/finetune_glue.py --model_name_or_path outputs/luna-small --task_name sst2 \
        --glue_dir ../shared/data/glue --recipe paper --num_train_epochs 3 --output_dir outputs/luna-small-sst2

Data: `--task_name` alone loads `nyu-mll/glue` from the Hub; with `--glue_dir DIR` (or GLUE_DIR=DIR) it reads the
task's TSV files from DIR/<task>/ instead; `--train_file/--validation_file/--test_file` (tsv in GLUE's layout, csv,
json, jsonl, parquet) are read as given. See docs/finetuning.md.
"""

import csv
import json
import logging
import os
import sys
from argparse import ArgumentParser
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import evaluate
import numpy as np
import tokenizers
import torch
import transformers
from datasets import ClassLabel, DatasetDict, Features, load_dataset
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    EarlyStoppingCallback,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    pipeline,
    set_seed,
)

import luna_hf  # noqa: F401  (registers "luna" with the Auto classes)
from luna_hf.model_card import LEARNED_KERNEL_DESCRIPTION

logger = logging.getLogger(__name__)

MODEL_CARD_TEMPLATE = Path(__file__).resolve().parent.parent / "model_cards" / "luna_glue_template.md"


@dataclass(frozen=True)
class GlueTask:
    keys: tuple  # text columns in nyu-mll/glue
    labels: tuple | None  # ClassLabel names of nyu-mll/glue; None: regression
    metrics: tuple  # what evaluate's "glue" metric returns; the first one selects the best checkpoint
    title: str
    domain: str
    citation: str
    folder: str  # the task's folder in GLUE's own download
    terms: str = ""


GLUE_TASKS = {
    "cola": GlueTask(("sentence", None), ("unacceptable", "acceptable"), ("matthews_correlation",), "CoLA",
                     "sentences from linguistics publications", "Warstadt et al., 2019, Neural Network Acceptability "
                     "Judgments (TACL).", "CoLA"),
    "sst2": GlueTask(("sentence", None), ("negative", "positive"), ("accuracy",), "SST-2 (binary sentiment)",
                     "movie review sentences", "Socher et al., 2013, Recursive Deep Models for Semantic "
                     "Compositionality Over a Sentiment Treebank (EMNLP).", "SST-2",
                     "SST-2 comes from the Stanford Sentiment Treebank (rottentomatoes.com review excerpts), "
                     "distributed for research without a formal licence."),
    "mrpc": GlueTask(("sentence1", "sentence2"), ("not_equivalent", "equivalent"), ("accuracy", "f1"), "MRPC",
                     "news sentences", "Dolan and Brockett, 2005, Automatically Constructing a Corpus of Sentential "
                     "Paraphrases (IWP).", "MRPC"),
    "qqp": GlueTask(("question1", "question2"), ("not_duplicate", "duplicate"), ("accuracy", "f1"),
                    "QQP (duplicate questions)", "Quora questions", "Iyer, Dandekar and Csernai, 2017, First Quora "
                    "Dataset Release: Question Pairs.", "QQP",
                    "QQP is subject to Quora's Terms of Service: non-commercial / research use only. This model was "
                    "trained on it: do not use it commercially."),
    "stsb": GlueTask(("sentence1", "sentence2"), None, ("pearson", "spearmanr"), "STS-B (similarity, 0-5)",
                     "news, captions and forum sentences", "Cer et al., 2017, SemEval-2017 Task 1: Semantic Textual "
                     "Similarity (SemEval).", "STS-B"),
    "mnli": GlueTask(("premise", "hypothesis"), ("entailment", "neutral", "contradiction"), ("accuracy",), "MNLI",
                     "sentence pairs from ten genres", "Williams, Nangia and Bowman, 2018, A Broad-Coverage "
                     "Challenge Corpus for Sentence Understanding through Inference (NAACL).", "MNLI"),
    "qnli": GlueTask(("question", "sentence"), ("entailment", "not_entailment"), ("accuracy",),
                     "QNLI (question answering NLI)", "Wikipedia sentences and crowd-sourced questions",
                     "Rajpurkar et al., 2016, SQuAD: 100,000+ Questions for Machine Comprehension of Text (EMNLP).",
                     "QNLI", "QNLI is derived from SQuAD v1.1, whose Wikipedia text is under CC BY-SA 4.0."),
    "rte": GlueTask(("sentence1", "sentence2"), ("entailment", "not_entailment"), ("accuracy",), "RTE",
                    "news and Wikipedia sentences", "Bentivogli et al., 2009, The Fifth PASCAL Recognizing Textual "
                    "Entailment Challenge (TAC), and the earlier RTE challenges.", "RTE"),
    "wnli": GlueTask(("sentence1", "sentence2"), ("not_entailment", "entailment"), ("accuracy",), "WNLI",
                     "fiction-style sentences", "Levesque, Davis and Morgenstern, 2012, The Winograd Schema "
                     "Challenge (KR).", "WNLI"),
}
# Local files: text columns by name (GLUE's TSV headers and nyu-mll/glue's), label column, columns that are not text.
PAIR_COLUMNS = [("sentence1", "sentence2"), ("premise", "hypothesis"), ("question", "sentence"),
                ("question1", "question2"), ("#1 String", "#2 String")]
LABEL_COLUMNS = ["label", "is_duplicate", "gold_label", "Quality", "score"]
ID_COLUMNS = {"idx", "index", "id", "qid1", "qid2", "#1 ID", "#2 ID", "promptID", "pairID", "genre", "filename",
              "year", "old_index", "source1", "source2", "label1", "label2", "label3", "label4", "label5"}
GLUE_DIR_FILES = {"train": ["train.tsv", "train_subset.tsv"],
                  "validation": ["dev.tsv", "dev_matched.tsv", "heldout_subset.tsv"],
                  "test": ["test.tsv", "test_matched.tsv"]}
FALLBACK_METRICS = {
    "accuracy": lambda predictions, references: accuracy_score(references, predictions),
    "f1": lambda predictions, references: f1_score(references, predictions),
    "matthews_correlation": lambda predictions, references: matthews_corrcoef(references, predictions),
    "pearson": lambda predictions, references: pearsonr(predictions, references)[0],
    "spearmanr": lambda predictions, references: spearmanr(predictions, references)[0],
}
# Paper Table 9 (GLUE column) and the authors' examples/luna/README.glue.md: Adam (0.9, 0.98), eps 1e-6, lr 1e-5,
# weight decay 0.1, batch 32, 6% linear warmup then linear (= fairseq polynomial, power 1) decay to 0, 20 epochs,
# best epoch on the dev metric. Early-stopping patience is not given there: 5 epochs is this script's choice.
RECIPES = {
    "paper": dict(learning_rate=1e-5, per_device_train_batch_size=32, weight_decay=0.1, warmup_steps=0.06,
                  lr_scheduler_type="linear", adam_beta1=0.9, adam_beta2=0.98, adam_epsilon=1e-6, num_train_epochs=20,
                  eval_strategy="epoch", save_strategy="epoch", save_total_limit=2, load_best_model_at_end=True,
                  early_stopping_patience=5),
}
EXAMPLES = {1: ("A gripping, beautifully acted film.",), 2: ("Where is the Eiffel Tower?", "It stands in Paris.")}


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "A Luna (or RoBERTa, BERT, ...) folder or Hub model id."})
    config_name: str | None = field(default=None, metadata={"help": "Config name or path, if not the model's."})
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer name or path, if not the model's."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where to keep downloaded models and datasets."})
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of a Hub model."})
    token: str | None = field(default=None, metadata={"help": "Hub token (default: the one of `hf auth login`)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow a Hub model's own code to run."})
    ignore_mismatched_sizes: bool = field(default=False, metadata={"help": "Replace a head of another size."})
    from_scratch: bool = field(
        default=False, metadata={"help": "Random weights from the config: a baseline without pretraining."}
    )
    teacher_name_or_path: str | None = field(
        default=None, metadata={"help": "A classifier finetuned on the same task with the same tokenizer (e.g. the "
                                        "model this one was converted from) to distil from: the training loss "
                                        "becomes (1 - alpha) * task loss + alpha * T^2 * KL(teacher || model) of "
                                        "the predictions at temperature T (Hinton et al., 2015)."}
    )
    distillation_alpha: float = field(default=0.5, metadata={"help": "alpha: the distillation term's weight."})
    distillation_temperature: float = field(default=2.0, metadata={"help": "T: softens both predictions."})

    def __post_init__(self):
        if not 0 <= self.distillation_alpha <= 1 or self.distillation_temperature <= 0:
            raise ValueError(
                f"--distillation_alpha must lie in [0, 1] (got {self.distillation_alpha}) and "
                f"--distillation_temperature must be positive (got {self.distillation_temperature})."
            )


@dataclass
class DataTrainingArguments:
    task_name: str | None = field(default=None, metadata={"help": "GLUE task: " + ", ".join(GLUE_TASKS)})
    glue_dir: str | None = field(
        default=None, metadata={"help": "Local GLUE folder (DIR/sst2/train.tsv or DIR/SST-2/train.tsv, ...) used "
                                        "instead of the Hub for --task_name. Default: $GLUE_DIR."}
    )
    train_file: str | None = field(default=None, metadata={"help": "tsv (GLUE layout), csv, json(l) or parquet."})
    validation_file: str | None = field(default=None, metadata={"help": "The same, for evaluation."})
    test_file: str | None = field(default=None, metadata={"help": "The same, for --do_predict (labels optional)."})
    max_seq_length: int = field(default=128, metadata={"help": "Longer inputs are truncated."})
    pad_to_max_length: bool = field(default=False, metadata={"help": "Pad to max_seq_length, not per batch."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N evaluation rows."})
    max_predict_samples: int | None = field(default=None, metadata={"help": "Use only the first N test rows."})
    recipe: str | None = field(
        default=None, metadata={"help": "'paper': the paper's GLUE finetuning hyperparameters (Table 9) as "
                                        "defaults; any flag given overrides them.", "choices": list(RECIPES)}
    )
    early_stopping_patience: int | None = field(
        default=None, metadata={"help": "Stop after N evaluations without improvement of the task metric."}
    )
    allow_noncommercial_push: bool = field(
        default=False, metadata={"help": "Allow --push_to_hub for a model trained on QQP (Quora's terms: "
                                         "non-commercial). Refused otherwise."}
    )

    def __post_init__(self):
        self.glue_dir = self.glue_dir or os.environ.get("GLUE_DIR") or None
        if self.task_name is not None:
            self.task_name = self.task_name.lower().replace("-", "")
            if self.task_name not in GLUE_TASKS:
                raise ValueError(f"Unknown task {self.task_name!r}: pick one of {', '.join(GLUE_TASKS)}.")
        elif self.train_file is None and self.validation_file is None:
            raise ValueError("Give a GLUE --task_name, or --train_file/--validation_file.")


def read_table(path, cache_dir):
    """One local file as a Dataset. GLUE's TSV files are read with quoting off: their text contains literal `"`."""
    suffix = Path(path).suffix.lower().lstrip(".")
    if not Path(path).is_file():
        raise FileNotFoundError(f"No such data file: {path}")
    options = {
        "tsv": ("csv", dict(delimiter="\t", quoting=csv.QUOTE_NONE, keep_default_na=False)),
        "csv": ("csv", dict(keep_default_na=False)),
        "json": ("json", {}),
        "jsonl": ("json", {}),
        "parquet": ("parquet", {}),
    }
    if suffix not in options:
        raise ValueError(f"{path}: unsupported extension {suffix!r}; use tsv, csv, json, jsonl or parquet.")
    builder, kwargs = options[suffix]
    try:
        return load_dataset(builder, data_files=str(path), split="train", cache_dir=cache_dir, **kwargs)
    except Exception as error:  # pandas/pyarrow parse errors: say which file
        raise ValueError(f"Could not read {path} as {suffix}: {error}") from error


def glue_dir_files(glue_dir, task):
    folder = next((Path(glue_dir) / name for name in (task, GLUE_TASKS[task].folder)
                   if (Path(glue_dir) / name).is_dir()), None)
    if folder is None:
        raise FileNotFoundError(f"No {task} or {GLUE_TASKS[task].folder} folder in --glue_dir {glue_dir}.")
    files = {split: next((folder / f for f in names if (folder / f).is_file()), None)
             for split, names in GLUE_DIR_FILES.items()}
    return {split: str(path) for split, path in files.items() if path is not None}


def detect_columns(columns, path):
    """(text column, second text column or None, label column or None), as run_glue but knowing GLUE's headers."""
    label = next((c for c in LABEL_COLUMNS if c in columns), None)
    for pair in PAIR_COLUMNS:
        if set(pair) <= set(columns):
            return (*pair, label)
    if "sentence" in columns:
        return "sentence", None, label
    texts = [c for c in columns if c != label and c not in ID_COLUMNS and not c.endswith("_parse")]
    if not texts:
        raise ValueError(f"{path}: no text column among {columns}. GLUE's CoLA files have no header row: add one.")
    return texts[0], (texts[1] if len(texts) > 1 else None), label


def load_local(files, task, cache_dir):
    """Local files as a DatasetDict with the text columns renamed to `text`/`text_pair` and the label to `label`."""
    raw, keys = DatasetDict(), None
    for split, path in files.items():
        table = read_table(path, cache_dir)
        detected = detect_columns(table.column_names, path)
        keys = keys or detected[:2]
        if detected[:2] != keys:
            raise ValueError(f"{path}: text columns {detected[:2]} differ from the training file's {keys}.")
        if detected[2] is None and split != "test":
            raise ValueError(f"{path}: no label column (one of {LABEL_COLUMNS}) among {table.column_names}.")
        names = {keys[0]: "text", keys[1]: "text_pair", detected[2]: "label"}
        table = table.select_columns([c for c in names if c is not None])
        raw[split] = table.rename_columns({c: n for c, n in names.items() if c is not None and c != n})
        logger.info(f"{split}: {path} ({table.num_rows} rows, text columns {keys})")
    if task and (keys[1] is None) != (GLUE_TASKS[task].keys[1] is None):
        raise ValueError(f"--task_name {task} expects {'pairs' if GLUE_TASKS[task].keys[1] else 'single sentences'}"
                         f" but the files have text columns {keys}.")
    return raw, keys


def load_glue_from_hub(task, model_args):
    try:
        raw = load_dataset("nyu-mll/glue", task, cache_dir=model_args.cache_dir, token=model_args.token)
    except Exception as error:
        raise SystemExit(f"Could not load nyu-mll/glue/{task} from the Hub ({error}).\nWithout network, point "
                         "--glue_dir (or GLUE_DIR) at a folder with the task's GLUE TSV files, e.g. GLUE_DIR/sst2/"
                         "{train,dev}.tsv, or give --train_file/--validation_file.") from error
    if task == "mnli":
        raw = DatasetDict(train=raw["train"], validation=raw["validation_matched"], test=raw["test_matched"])
    keys = GLUE_TASKS[task].keys
    raw = raw.rename_columns({k: n for k, n in zip(keys, ("text", "text_pair"), strict=True) if k is not None})
    return raw.remove_columns([c for c in raw["train"].column_names if c not in ("text", "text_pair", "label")]), keys


def encode_labels(raw, task):
    """Label names (None: regression) and the label column as ids; GLUE names come from the task."""
    known = GLUE_TASKS[task].labels if task else None
    reference = raw["train"] if "train" in raw else raw["validation"]
    if isinstance(reference.features.get("label"), ClassLabel):  # nyu-mll/glue
        return reference.features["label"].names, raw
    is_regression = (task == "stsb") or (task is None and reference.features["label"].dtype.startswith("float"))
    labelled = [split for split in raw if "label" in raw[split].column_names]
    if is_regression:
        for split in labelled:
            raw[split] = raw[split].cast_column("label", datasets.Value("float32"))
        return None, raw
    values = {str(v) for split in labelled for v in raw[split]["label"]}
    values = sorted(values, key=lambda v: (0, int(v), "") if v.lstrip("-").isdigit() else (1, 0, v))
    names = list(known) if known else values
    if not known and values == [str(index) for index in range(len(values))]:  # ids, no names: transformers' defaults
        names = [f"LABEL_{index}" for index in range(len(values))]
    mapping = {}
    for value in values:
        if value in names:
            mapping[value] = names.index(value)
        elif value.isdigit() and int(value) < len(names):
            mapping[value] = int(value)
        else:
            raise ValueError(f"Label {value!r} is not one of {names} (nor an index into them).")
    label = ClassLabel(names=names)
    for split in labelled:
        raw[split] = raw[split].map(lambda b: {"label": [mapping[str(v)] for v in b["label"]]}, batched=True,
                                    features=Features({**raw[split].features, "label": label}), desc=f"labels {split}")
    return names, raw


class TaskMetric:
    """The task's GLUE metric from `evaluate` when it loads (the Hub), else the same numbers from sklearn/scipy."""

    def __init__(self, task, is_regression, cache_dir=None):
        config = task or ("stsb" if is_regression else "sst2")  # local data: STS-B's or SST-2's metric
        self.names = GLUE_TASKS[config].metrics
        self.is_regression = is_regression
        try:
            self.metric = evaluate.load("glue", config, cache_dir=cache_dir)
        except Exception as error:
            self.metric = None
            logger.warning(f"evaluate.load('glue', {config!r}) failed ({type(error).__name__}); computing "
                           f"{', '.join(self.names)} with scikit-learn/scipy.")

    def __call__(self, prediction):
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        predictions = np.squeeze(logits) if self.is_regression else np.argmax(logits, axis=1)
        if self.metric is not None:
            result = self.metric.compute(predictions=predictions, references=prediction.label_ids)
        else:
            result = {name: float(FALLBACK_METRICS[name](predictions, prediction.label_ids)) for name in self.names}
        if len(result) > 1:
            result["combined_score"] = float(np.mean(list(result.values())))
        return result


class CardTrainer(Trainer):
    """`create_model_card` (which `Trainer.push_to_hub` calls too) writes the card rendered from our template."""

    model_card = None

    def create_model_card(self, **kwargs):
        if self.model_card is None:
            return super().create_model_card(**kwargs)
        if self.is_world_process_zero():
            self.model_card.save(os.path.join(self.args.output_dir, "README.md"))


class DistillingTrainer(CardTrainer):
    """The task loss mixed with the distillation loss from a frozen teacher, in training; evaluation keeps the task
    loss alone."""

    def __init__(self, *args, teacher, alpha, temperature, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher, self.alpha, self.temperature = teacher.to(self.args.device).eval(), alpha, temperature

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training:
            with torch.no_grad():
                teacher_logits = self.teacher(**{k: v for k, v in inputs.items() if k != "labels"}).logits
            distillation = distillation_loss(outputs.logits, teacher_logits, self.temperature)
            loss = (1 - self.alpha) * loss + self.alpha * distillation
        return (loss, outputs) if return_outputs else loss


def distillation_loss(logits, teacher_logits, temperature):
    """T^2 * KL(teacher || model) of the predictions softened by T, averaged over examples (Hinton et al., 2015):
    T^2 keeps its gradients on the task loss's scale whatever T."""
    log_probabilities = torch.log_softmax(logits.float() / temperature, dim=-1)
    teacher_log_probabilities = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    divergence = nn.functional.kl_div(log_probabilities, teacher_log_probabilities, reduction="batchmean",
                                      log_target=True)
    return divergence * temperature**2


def load_teacher(model_args, config, tokenizer):
    """The frozen teacher of --teacher_name_or_path, checked to predict the model's labels from the same token ids."""
    path = model_args.teacher_name_or_path
    if config.problem_type == "regression":
        raise ValueError("--teacher_name_or_path distils a classifier's predictions; this task is a regression.")
    options = dict(cache_dir=model_args.cache_dir, token=model_args.token,
                   trust_remote_code=model_args.trust_remote_code)
    teacher = AutoModelForSequenceClassification.from_pretrained(path, **options)
    if teacher.config.id2label != config.id2label:
        raise ValueError(
            f"The teacher {path} predicts {list(teacher.config.id2label.values())}, the task's labels are "
            f"{list(config.id2label.values())} (in that order): distil from a model finetuned on this task."
        )
    if AutoTokenizer.from_pretrained(path, **options).get_vocab() != tokenizer.get_vocab():
        raise ValueError(
            f"The teacher {path} has another tokenizer than the model: both read the same token ids, so distil from "
            "a model with the model's tokenizer (e.g. the one it was converted from)."
        )
    return teacher.requires_grad_(False)


def is_qqp(task, keys, files):
    """QQP by task name, by its column names, or by a file path naming it."""
    return task == "qqp" or tuple(keys) == ("question1", "question2") or any("qqp" in f.lower() for f in files)


def render_model_card(repo_id, model, model_args, data_args, training_args, raw, metrics, data_source, qqp):
    """The README.md pushed with the model: model_cards/luna_glue_template.md filled in from this run."""
    task, names = data_args.task_name, model.config.id2label if model.config.problem_type != "regression" else None
    info = GLUE_TASKS.get(task)
    base = model_args.model_name_or_path
    base_is_hub_id = not Path(base).exists() and not model_args.from_scratch
    split = "validation" if data_source == "nyu-mll/glue" else Path(data_args.validation_file or "").name or "dev"
    card_data = ModelCardData(
        language="en",
        license="other" if qqp else "apache-2.0",
        library_name="transformers",
        pipeline_tag="text-classification",
        tags=["luna", "text-classification", "glue"] + ([task] if task else []),
        datasets=["nyu-mll/glue"] if task else None,
        base_model=base if base_is_hub_id else None,
        metrics=list(GLUE_TASKS[task].metrics) if task else None,
        model_name=repo_id,
        eval_results=[EvalResult(task_type="text-classification", dataset_type="nyu-mll/glue", dataset_name=f"GLUE "
                                 f"{task.upper()}", dataset_config=task, dataset_split=split, metric_type=name,
                                 metric_value=float(metrics[f"eval_{name}"])) for name in info.metrics]
        if info and all(f"eval_{name}" in metrics for name in info.metrics) else None,
    )
    arguments, epochs_run = training_args, metrics.get("epoch", 0)
    hyperparameters = [
        ("recipe", data_args.recipe or "none (script defaults)"),
        ("learning rate", arguments.learning_rate),
        ("train batch size", arguments.per_device_train_batch_size * max(1, arguments.world_size)
         * arguments.gradient_accumulation_steps),
        ("epochs (max / run)", f"{arguments.num_train_epochs:g} / {epochs_run:g}"),
        ("optimizer", f"{getattr(arguments.optim, 'value', arguments.optim)} betas=({arguments.adam_beta1}, "
                      f"{arguments.adam_beta2}) eps={arguments.adam_epsilon}"),
        ("weight decay", arguments.weight_decay),
        ("schedule", f"{getattr(arguments.lr_scheduler_type, 'value', arguments.lr_scheduler_type)}, warmup "
                     f"{arguments.warmup_steps:g}"),
        ("max sequence length", data_args.max_seq_length),
        ("early stopping patience", data_args.early_stopping_patience),
        ("best checkpoint by", arguments.metric_for_best_model if arguments.load_best_model_at_end else "last"),
        ("seed", arguments.seed),
        ("distilled from", f"`{Path(model_args.teacher_name_or_path).name}` (alpha {model_args.distillation_alpha:g}, "
                           f"T {model_args.distillation_temperature:g})" if model_args.teacher_name_or_path else None),
    ]
    text_pair = "text_pair" in next(iter(raw.values())).column_names
    example = EXAMPLES[2 if text_pair else 1]
    config = model.config
    learned_kernel = config.model_type == "luna" and config.attention_type == "learned_kernel"

    def describe(split, path):
        if split not in raw:
            return "none"
        source = (f"the GLUE {info.title} {split} set (`nyu-mll/glue`)" if data_source == "nyu-mll/glue"
                  else f"the local file `{Path(path).name}`" + (f" (GLUE {info.title})" if info else ""))
        return f"{len(raw[split])} examples of {source}"
    return ModelCard.from_template(
        card_data,
        template_path=str(MODEL_CARD_TEMPLATE),
        model_id=repo_id,
        model_type_name="A learned-kernel (LUNA, 2025) encoder" if learned_kernel
        else "Luna" if config.model_type == "luna" else config.model_type,
        is_luna=config.model_type == "luna",
        is_learned_kernel=learned_kernel,
        learned_kernel_description=LEARNED_KERNEL_DESCRIPTION,
        projected_length=getattr(config, "projected_length", None),
        base_model_name=(f"`{base}`" if base_is_hub_id else f"a local checkpoint (`{Path(base).name}`)")
        + (" with random weights (no pretraining)" if model_args.from_scratch else ""),
        task_title=f"GLUE {info.title}" if info else "text classification",
        glue_task=bool(task),
        problem="regression" if names is None else "sentence-pair classification" if text_pair else "classification",
        label_names=[names[i] for i in range(len(names))] if names else None,
        score_range="0 to 5" if task == "stsb" else None,
        text_pair=text_pair,
        example_text=example[0],
        example_text_pair=example[-1],
        metrics=[(k.removeprefix("eval_"), float(v)) for k, v in metrics.items()
                 if k.removeprefix("eval_") in (*FALLBACK_METRICS, "combined_score")],
        eval_description=describe("validation", data_args.validation_file),
        train_description=describe("train", data_args.train_file),
        hyperparameters=[(k, v) for k, v in hyperparameters if v is not None],
        recipe_note="The `paper` recipe is the GLUE column of the paper's Table 9." if data_args.recipe else "",
        framework_versions=f"transformers {transformers.__version__}, PyTorch {torch.__version__}, datasets "
                           f"{datasets.__version__}, tokenizers {tokenizers.__version__}",
        data_domain=info.domain if info else "the finetuning data",
        data_terms=GLUE_TASKS["qqp"].terms if qqp else info.terms if info else "",
        data_citation=info.citation if info else "",
    )


def parse_args(argv):
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(json_file=os.path.abspath(argv[0]))
    recipe = ArgumentParser(add_help=False)
    recipe.add_argument("--recipe", choices=list(RECIPES))
    chosen = recipe.parse_known_args(argv)[0].recipe
    if chosen:
        parser.set_defaults(**RECIPES[chosen])  # flags given on the command line still win
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        # Launched as several processes on a machine without a GPU: the Trainer forms one gloo DDP job only with
        # use_cpu; otherwise it would run N separate copies writing the same output_dir.
        parser.set_defaults(use_cpu=True)
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    explicit = any(a.replace("-", "_").startswith("__metric_for_best_model") for a in argv)
    if training_args.load_best_model_at_end and not explicit:
        training_args.metric_for_best_model = None  # chosen from the task below, not "loss"
    return model_args, data_args, training_args


def main(argv=None):
    model_args, data_args, training_args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stdout)])
    log_level = training_args.get_process_log_level()
    logger.setLevel(logging.INFO if training_args.should_log else log_level)  # this script's own messages
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    set_seed(training_args.seed)

    raw, label_names, data_source, qqp = load_data(model_args, data_args, training_args)
    model, tokenizer, max_seq_length = load_model(model_args, data_args, label_names)
    encoded = tokenize_splits(raw, tokenizer, max_seq_length, data_args, training_args)
    trainer = build_trainer(model, tokenizer, encoded, model_args, data_args, training_args, label_names is None)
    all_metrics = train_evaluate_predict(trainer, tokenizer, raw, encoded, label_names, data_args, training_args,
                                         max_seq_length)

    if training_args.do_train or training_args.push_to_hub:  # the saved folder's card; a push uploads the same one
        repo_id = getattr(trainer, "hub_model_id", None) or training_args.hub_model_id  # Trainer adds the namespace
        trainer.model_card = render_model_card(
            repo_id or Path(training_args.output_dir).name, trainer.model, model_args, data_args, training_args, raw,
            all_metrics, data_source, qqp,
        )
        trainer.create_model_card()
    if training_args.push_to_hub:
        trainer.push_to_hub(commit_message=f"Finetuned on {data_args.task_name or 'local data'}")
    return all_metrics


def load_data(model_args, data_args, training_args):
    """The raw splits with encoded labels, their label names (None: regression), source, and whether it is QQP."""
    task = data_args.task_name
    files = {s: f for s, f in (("train", data_args.train_file), ("validation", data_args.validation_file),
                               ("test", data_args.test_file)) if f}
    if not files and task and data_args.glue_dir:
        files = glue_dir_files(data_args.glue_dir, task)
        data_args.train_file, data_args.validation_file = files.get("train"), files.get("validation")
    raw, keys = load_local(files, task, model_args.cache_dir) if files else load_glue_from_hub(task, model_args)
    data_source = "local" if files else "nyu-mll/glue"
    qqp = is_qqp(task, keys, files.values())
    if training_args.push_to_hub and qqp and not data_args.allow_noncommercial_push:
        raise SystemExit("Refusing to push a model trained on QQP: Quora's terms allow non-commercial use only. If "
                         "your use complies, pass --allow_noncommercial_push (the card then states the terms).")
    label_names, raw = encode_labels(raw, task)
    return raw, label_names, data_source, qqp


def load_model(model_args, data_args, label_names):
    """The classifier with the task's labels, its tokenizer, and the input length both allow."""
    is_regression, task = label_names is None, data_args.task_name
    config = AutoConfig.from_pretrained(
        model_args.config_name or model_args.model_name_or_path,
        num_labels=1 if is_regression else len(label_names),
        id2label={0: "similarity"} if is_regression else dict(enumerate(label_names)),
        label2id={"similarity": 0} if is_regression else {n: i for i, n in enumerate(label_names)},
        problem_type="regression" if is_regression else "single_label_classification",
        finetuning_task=task,
        cache_dir=model_args.cache_dir, revision=model_args.model_revision, token=model_args.token,
        trust_remote_code=model_args.trust_remote_code,
    )
    if data_args.recipe == "paper" and config.model_type == "luna":
        config.activation_dropout = 0.0 if task == "sst2" else 0.1  # authors' README.glue.md
    tokenizer = AutoTokenizer.from_pretrained(
        model_args.tokenizer_name or model_args.model_name_or_path, cache_dir=model_args.cache_dir,
        revision=model_args.model_revision, token=model_args.token, trust_remote_code=model_args.trust_remote_code,
    )
    if model_args.from_scratch:
        model = AutoModelForSequenceClassification.from_config(config, trust_remote_code=model_args.trust_remote_code)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(
            model_args.model_name_or_path, config=config, cache_dir=model_args.cache_dir,
            revision=model_args.model_revision, token=model_args.token,
            trust_remote_code=model_args.trust_remote_code, ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
        )
    max_positions = getattr(config, "max_position_embeddings", None)
    if config.model_type == "luna":  # RoBERTa's or, converted from BERT, BERT's position numbering
        max_positions = config.max_sequence_length
    elif max_positions and config.model_type in ("roberta", "xlm-roberta", "camembert"):
        max_positions -= config.pad_token_id + 1  # RoBERTa-style positions start after the padding index
    max_seq_length = min(data_args.max_seq_length, tokenizer.model_max_length, max_positions or sys.maxsize)
    if max_seq_length < data_args.max_seq_length:
        logger.warning(f"--max_seq_length {data_args.max_seq_length} exceeds what the model takes: using "
                       f"{max_seq_length}.")
    return model, tokenizer, max_seq_length


def tokenize_splits(raw, tokenizer, max_seq_length, data_args, training_args):
    def tokenize(batch):
        texts = (batch["text"], batch["text_pair"]) if "text_pair" in batch else (batch["text"],)
        return tokenizer(*texts, padding="max_length" if data_args.pad_to_max_length else False,
                         max_length=max_seq_length, truncation=True)

    limits = {"train": data_args.max_train_samples, "validation": data_args.max_eval_samples,
              "test": data_args.max_predict_samples}
    for split in list(raw):
        if limits.get(split) is not None:
            raw[split] = raw[split].select(range(min(limits[split], len(raw[split]))))
    with training_args.main_process_first(desc="dataset map tokenization"):
        encoded = DatasetDict({split: raw[split].map(
            tokenize, batched=True, remove_columns=[c for c in raw[split].column_names if c != "label"],
            desc=f"Tokenizing {split}") for split in raw})
    for split in ("train", "validation"):
        needed = training_args.do_train if split == "train" else training_args.do_eval
        if needed and split not in encoded:
            raise ValueError(f"--do_{'train' if split == 'train' else 'eval'} needs a {split} split.")
    return encoded


def build_trainer(model, tokenizer, encoded, model_args, data_args, training_args, is_regression):
    """The Trainer with the task's metric and early stopping; a DistillingTrainer when a teacher is given."""
    metric = TaskMetric(data_args.task_name, is_regression, model_args.cache_dir)
    if training_args.load_best_model_at_end and training_args.metric_for_best_model is None:
        training_args.metric_for_best_model, training_args.greater_is_better = metric.names[0], True
    callbacks = []
    if data_args.early_stopping_patience:
        if not training_args.load_best_model_at_end:
            raise ValueError("--early_stopping_patience needs --load_best_model_at_end (and eval/save strategies).")
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=data_args.early_stopping_patience))
    distillation = {}
    if model_args.teacher_name_or_path:
        distillation = dict(teacher=load_teacher(model_args, model.config, tokenizer),
                            alpha=model_args.distillation_alpha, temperature=model_args.distillation_temperature)
    return (DistillingTrainer if distillation else CardTrainer)(
        model=model,
        args=training_args,
        train_dataset=encoded["train"] if training_args.do_train else None,
        eval_dataset=encoded["validation"] if "validation" in encoded else None,
        processing_class=tokenizer,
        data_collator=None if data_args.pad_to_max_length else DataCollatorWithPadding(tokenizer),
        compute_metrics=metric,
        callbacks=callbacks,
        **distillation,
    )


def train_evaluate_predict(trainer, tokenizer, raw, encoded, label_names, data_args, training_args, max_seq_length):
    """--do_train, --do_eval, --do_predict in turn; returns their metrics."""
    all_metrics = {}
    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()
        all_metrics.update(result.metrics, train_samples=len(encoded["train"]))
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()
    if training_args.do_eval:
        eval_metrics = trainer.evaluate()
        eval_metrics["eval_samples"] = len(encoded["validation"])
        all_metrics.update(eval_metrics)
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        show_predictions(trainer.model, tokenizer, raw["validation"], label_names, max_seq_length)
    if training_args.do_predict:
        if "test" not in encoded:
            raise ValueError("--do_predict needs a test split (--test_file, or a task with one).")
        test = encoded["test"].remove_columns([c for c in ("label",) if c in encoded["test"].column_names])
        logits = trainer.predict(test, metric_key_prefix="predict").predictions
        is_regression, task = label_names is None, data_args.task_name
        predictions = np.squeeze(logits) if is_regression else np.argmax(logits, axis=1)
        if trainer.is_world_process_zero():
            path = Path(training_args.output_dir) / f"predict_results_{task or 'local'}.txt"
            lines = [f"{i}\t{p:.3f}" if is_regression else f"{i}\t{label_names[p]}" for i, p in enumerate(predictions)]
            path.write_text("index\tprediction\n" + "\n".join(lines) + "\n")
            logger.info(f"Predictions written to {path}")
    return all_metrics


def show_predictions(model, tokenizer, examples, label_names, max_seq_length, count=3):
    """A few pipeline() predictions on evaluation rows, beside their gold labels, truncated as the rows were for the
    evaluation (a long document would not fit the model otherwise)."""
    classify = pipeline("text-classification", model=model, tokenizer=tokenizer, device=model.device)
    rows = examples.select(range(min(count, len(examples))))
    inputs = [{"text": r["text"], "text_pair": r["text_pair"]} if "text_pair" in r else r["text"] for r in rows]
    outputs = classify(inputs, truncation=True, max_length=max_seq_length)
    for row, output in zip(rows, outputs, strict=True):
        gold = row.get("label")
        gold = gold if label_names is None or gold is None else label_names[gold]
        logger.info(f"pipeline: {json.dumps(row['text'][:80])} -> {output['label']} ({output['score']:.3f}); "
                    f"gold {gold}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Train and test Luna or a same-size Transformer on a Long Range Arena task, with the `Trainer`.

    python scripts/lra/listops.py --output_dir data/lra/listops
    python scripts/lra/run_lra.py --task listops --data_dir data/lra/listops --model luna --projected_length 16
    python scripts/lra/run_lra.py --task listops --data_dir data/lra/listops --model transformer

`--config paper` is the paper's Table 7 recipe on the authors' LRA architectures (`luna_lra_*`: post-LN, untied
key/value, learned positions, a `<CLS>` token prepended); `--config small` is the small model and recipe of the
Skyformer / Nystromformer LRA harness (2 layers, hidden 64, AdamW, linear decay; the Transformer mean-pools its
valid tokens); `--config cpu` (default) is a reduced model and budget that runs on a 2-core CPU in minutes. Luna
is `LunaForSequenceClassification`; the Transformer is RoBERTa's architecture of the same size with SDPA
attention. Retrieval encodes both documents with one encoder and classifies [rep(doc2), rep(doc1)], as the authors
do ([u, v, u * v, u - v] with --config small, as the harness does). Pathfinder (scripts/lra/pathfinder.py) reads
pixels as tokens, as Image does. The model with the best validation accuracy is tested; the test accuracy, wall time
and settings go to `OUTPUT_DIR/lra_results.json` and are appended to `--results_file`. Interrupted? The same command
with `--resume_from_checkpoint latest` continues from the last checkpoint.
"""

import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from datasets import DatasetDict, load_dataset
from lra_models import (
    BUILD_COMMANDS,
    CLS_ID,
    LISTOPS_SYMBOLS,
    LISTOPS_VOCAB,
    PAD_ID,
    PIXEL_TASKS,
    TASK_COLUMNS,
    LRAArguments,
    TaskConfig,
    build_model,
)
from torch import nn
from transformers import (
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_utils import get_last_checkpoint

from luna_hf.model_card import write_model_card


def load_task_data(args: LRAArguments) -> tuple[DatasetDict, dict]:
    """The three splits and the builder's info; a clear error for a missing or malformed folder."""
    folder = Path(args.data_dir)
    if args.task == "listops":
        files = {split: folder / f"basic_{name}.tsv" for split, name in
                 {"train": "train", "validation": "val", "test": "test"}.items()}
        info = {"source": "ListOps (scripts/lra/listops.py)", "real": True, "label_names": [str(d) for d in range(10)]}
    else:
        files = {split: folder / f"{split}.parquet" for split in ("train", "validation", "test")}
        info_file = folder / "info.json"
        info = json.loads(info_file.read_text()) if info_file.is_file() else None
        if info is not None and info.get("task") != args.task:
            raise SystemExit(f"{folder} holds the {info.get('task')!r} task, not {args.task!r}.")
    missing = [str(path) for path in files.values() if not path.is_file()]
    if missing or info is None:
        raise SystemExit(f"{folder} is not a complete {args.task} folder (missing: "
                         f"{', '.join(missing) or 'info.json'}). Build it with: "
                         f"{BUILD_COMMANDS[args.task].replace('DIR', str(folder))}")
    if args.task == "listops":
        data = load_dataset("csv", data_files={k: str(v) for k, v in files.items()}, delimiter="\t", quoting=3)
    else:
        data = load_dataset("parquet", data_files={k: str(v) for k, v in files.items()})
    for split, dataset in data.items():
        if dataset.column_names != TASK_COLUMNS[args.task] or len(dataset) == 0:
            raise SystemExit(f"{files[split]} is malformed: expected columns {TASK_COLUMNS[args.task]} and at least "
                             f"one row, found {dataset.column_names} ({len(dataset)} rows). Rebuild it with: "
                             f"{BUILD_COMMANDS[args.task].replace('DIR', str(folder))}")
    return data.rename_column("Target", "label") if args.task == "listops" else data, info


def listops_ids(source: str) -> list[int]:
    """LRA's ListOps tokenizer: whitespace tokens, parentheses dropped."""
    tokens = [token for token in source.split() if token not in ("(", ")")]
    unknown = [token for token in tokens if token not in LISTOPS_VOCAB]
    if unknown:
        raise ValueError(f"ListOps source holds unknown symbols {sorted(set(unknown))[:5]}: regenerate the data with "
                         f"scripts/lra/listops.py.")
    return [LISTOPS_VOCAB[token] for token in tokens]


def byte_ids(text: str) -> list[int]:
    return [byte + 4 for byte in text.encode("utf-8")]


def make_encoder(task: str, max_length: int, prepend_cls: bool):
    """Row -> model inputs. ListOps, Image and Pathfinder have a fixed length (too long is an error); Text and
    Retrieval read the first `max_length` bytes of a document, which is how LRA defines them."""
    prefix = [CLS_ID] if prepend_cls else []

    def fit(ids: list[int]) -> list[int]:
        if len(ids) > max_length and task in ("listops", *PIXEL_TASKS):
            raise ValueError(f"A {task} input has {len(ids)} tokens, more than the model's {max_length}: pass "
                             f"--max_length {len(ids)} or rebuild the data with shorter sequences.")
        return prefix + ids[:max_length]

    def encode(batch: dict) -> dict:
        if task == "listops":
            return {"input_ids": [fit(listops_ids(source)) for source in batch["Source"]], "label": batch["label"]}
        if task in PIXEL_TASKS:
            return {"input_ids": [fit([pixel + 4 for pixel in row]) for row in batch["pixels"]],
                    "label": batch["label"]}
        if task == "text":
            return {"input_ids": [fit(byte_ids(text)) for text in batch["text"]], "label": batch["label"]}
        return {"input_ids": [fit(byte_ids(text)) for text in batch["text1"]],
                "input_ids2": [fit(byte_ids(text)) for text in batch["text2"]], "label": batch["label"]}

    return encode


def check_lengths(data: DatasetDict, args: LRAArguments, max_length: int) -> None:
    """Fail before training when a fixed-length task does not fit the model (Text/Retrieval are truncated), or
    when images were made at another size than the model's (learned positions are per pixel)."""
    task = args.task
    if task not in ("listops", *PIXEL_TASKS):
        return
    for split, dataset in data.items():
        column = dataset["Source"] if task == "listops" else dataset["pixels"]
        lengths = [len(listops_ids(source)) for source in column] if task == "listops" else [len(row) for row in column]
        if task in PIXEL_TASKS and set(lengths) != {max_length}:
            side = math.isqrt(max_length)
            remedy = (f"rebuild it with `{BUILD_COMMANDS[task].replace('DIR', 'NEW_DIR')} --image_size {side}`"
                      if task == "pathfinder" and side * side == max_length else "rebuild it at that size")
            raise SystemExit(f"{args.data_dir} holds {split} images of {sorted(set(lengths))} pixels, but --config "
                             f"{args.config} reads {max_length}: {remedy}, or pass --max_length {max(lengths)} "
                             f"(then the run is not at the config's length).")
        if max(lengths) > max_length:
            raise SystemExit(f"The longest {split} input has {max(lengths)} tokens, more than --max_length "
                             f"{max_length} (the model's positions): pass --max_length {max(lengths)}, or rebuild "
                             f"the data with shorter sequences.")


def prepare_data(args: LRAArguments, task: TaskConfig) -> tuple[DatasetDict, dict]:
    """The splits, cut to the configured sizes, checked and encoded on the fly."""
    data, info = load_task_data(args)
    if args.max_train_samples:
        data["train"] = data["train"].select(range(min(args.max_train_samples, len(data["train"]))))
    # Subsets are a fixed random sample (seed 0, whatever --seed), so that every model is scored on the same rows.
    for split, limit in (("validation", task.max_eval_samples), ("test", task.max_test_samples)):
        if limit and limit < len(data[split]):
            data[split] = data[split].shuffle(seed=0).select(range(limit))
    check_lengths(data, args, task.max_length)
    # The paper's P-mean rows (Table 3) drop the <CLS> token, as the authors' `--use-p` does; so does the harness's
    # mean-pooled Transformer.
    return data.with_transform(make_encoder(args.task, task.max_length, args.prepends_cls)), info


def pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), longest), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
    return input_ids, attention_mask


def collate(features: list[dict]) -> dict:
    batch = {"labels": torch.tensor([feature["label"] for feature in features])}
    batch["input_ids"], batch["attention_mask"] = pad([feature["input_ids"] for feature in features])
    if "input_ids2" in features[0]:
        batch["input_ids2"], batch["attention_mask2"] = pad([feature["input_ids2"] for feature in features])
    return batch


# ---------------------------------------------------------------------------------------------------- models


def accuracy(prediction) -> dict:
    return {"accuracy": float((np.argmax(prediction.predictions, axis=-1) == prediction.label_ids).mean())}


def training_arguments(args: LRAArguments, task: TaskConfig) -> TrainingArguments:
    return TrainingArguments(
        output_dir=args.output_dir, max_steps=task.max_steps, per_device_train_batch_size=task.batch_size,
        per_device_eval_batch_size=task.batch_size, learning_rate=task.learning_rate, weight_decay=task.weight_decay,
        adam_beta1=0.9, adam_beta2=task.adam_beta2, adam_epsilon=task.adam_epsilon, lr_scheduler_type=task.lr_scheduler,
        warmup_steps=task.warmup_steps,
        eval_strategy="steps", eval_steps=task.eval_steps, save_strategy="steps", save_steps=task.eval_steps,
        save_total_limit=2, load_best_model_at_end=True, metric_for_best_model="accuracy", logging_steps=50,
        seed=args.seed, data_seed=args.seed, remove_unused_columns=False, bf16=args.bf16, report_to=args.report_to,
        disable_tqdm=args.disable_tqdm, dataloader_pin_memory=torch.cuda.is_available(),
    )


def resume_checkpoint(args: LRAArguments) -> str | None:
    output_dir = Path(args.output_dir)
    if args.resume_from_checkpoint == "latest":
        checkpoint = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
        if checkpoint is None:
            raise SystemExit(f"--resume_from_checkpoint latest: no checkpoint-* folder in {output_dir}.")
        return checkpoint
    if args.resume_from_checkpoint is None and output_dir.is_dir() and any(output_dir.iterdir()) \
            and not args.overwrite_output_dir:
        raise SystemExit(f"{output_dir} is not empty: continue with --resume_from_checkpoint latest, start over with "
                         f"--overwrite_output_dir, or choose another --output_dir.")
    return args.resume_from_checkpoint


def write_card(args: LRAArguments, task: TaskConfig, info: dict, model: nn.Module, entry: dict) -> None:
    """README.md of the run's folder: the model, the task data, the accuracies this run measured."""
    config = model.config if hasattr(model, "config") else model.encoder.config
    substitute = "" if info["real"] else f" (an offline SUBSTITUTE for LRA's {info.get('substitute_for')})"
    usage = ("The classifier is `PairClassifier` of `scripts/lra/run_lra.py` (one encoder reads both documents): "
             "rebuild it with that script's `build_model` and load `model.safetensors` into it.")
    write_model_card(
        args.output_dir, config=config, script="scripts/lra/run_lra.py", usage=usage,
        load_class=None if args.task == "retrieval" else "AutoModelForSequenceClassification",
        title=f"LRA {args.task}: {args.run_name}, config {args.config}, seed {args.seed}",
        summary=f"A {args.run_name} classifier ({task.num_layers} layers, hidden {task.hidden_size}, inputs of "
                f"{task.max_length} tokens) trained from random weights on the Long Range Arena task {args.task} for "
                f"{entry['steps']} steps (batch {task.batch_size}, learning rate {task.learning_rate:g}).",
        data=f"{info['source']}{substitute}; the model with the best validation accuracy was tested.",
        metrics={name: entry[name] for name in ("test_accuracy", "best_validation_accuracy", "train_seconds")},
        limitations=[f"`--config {args.config}`: " + ("the paper's recipe." if args.config == "paper" else
                     "a budget sized for a CPU, far below the paper's (Table 7): the accuracy is not the paper's."),
                     "A Long Range Arena benchmark model: it classifies this task's inputs only."],
        tags=("long-range-arena", args.task), task_type="text-classification", dataset_name=f"lra-{args.task}",
    )  # fmt: skip


def validation_curve(log_history: list[dict]) -> list[list[float]]:
    """[step, validation accuracy] at every evaluation (a resumed run's history includes the earlier ones)."""
    return [[entry["step"], entry["eval_accuracy"]] for entry in log_history if "eval_accuracy" in entry]


def record(args: LRAArguments, task: TaskConfig, info: dict, results: dict) -> dict:
    entry = {"task": args.task, "model": args.run_name, "config": args.config, "seed": args.seed,
             "data": info["source"], "real_data": info["real"], **results,
             "settings": {**asdict(task), "classifier_pooling": "mean" if args.mean_pooled else args.classifier_pooling,
                          **({"projected_length": args.projected_length} if args.model == "luna" else {})}}
    Path(args.output_dir, "lra_results.json").write_text(json.dumps(entry, indent=2) + "\n")
    Path(args.results_file).parent.mkdir(parents=True, exist_ok=True)
    with open(args.results_file, "a") as handle:
        handle.write(json.dumps(entry) + "\n")
    return entry


def main(argv: list[str] | None = None) -> dict:
    (args,) = HfArgumentParser(LRAArguments).parse_args_into_dataclasses(args=argv)
    task = args.task_config()
    checkpoint = resume_checkpoint(args)
    set_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)

    data, info = prepare_data(args, task)
    vocab_size = 4 + (len(LISTOPS_SYMBOLS) if args.task == "listops" else 256)
    model = build_model(args, task, vocab_size, num_labels=len(info["label_names"]))

    trainer = Trainer(model=model, args=training_arguments(args, task), train_dataset=data["train"],
                      eval_dataset=data["validation"], data_collator=collate, compute_metrics=accuracy)
    start = time.perf_counter()
    train_output = trainer.train(resume_from_checkpoint=checkpoint)
    train_seconds = time.perf_counter() - start
    test = trainer.evaluate(data["test"], metric_key_prefix="test")
    trainer.save_model(args.output_dir)
    entry = record(args, task, info, {
        "test_accuracy": test["test_accuracy"], "best_validation_accuracy": trainer.state.best_metric,
        "train_seconds": round(train_seconds, 1), "train_loss": train_output.training_loss,
        "steps": trainer.state.global_step, "parameters": sum(p.numel() for p in model.parameters()),
        "resumed": checkpoint is not None, "device": str(trainer.args.device), "torch_threads": torch.get_num_threads(),
        "validation_curve": validation_curve(trainer.state.log_history),
    })
    write_card(args, task, info, model, entry)
    kind = "" if info["real"] else f" (SUBSTITUTE data for {info.get('substitute_for')})"
    print(f"=== LRA {args.task}{kind}, {args.run_name}, config {args.config}, seed {args.seed}: test accuracy "
          f"{entry['test_accuracy']:.4f} after {entry['steps']} steps, {entry['train_seconds']} s; "
          f"results in {os.path.join(args.output_dir, 'lra_results.json')}")
    return entry


if __name__ == "__main__":
    main()

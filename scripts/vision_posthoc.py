#!/usr/bin/env python
"""The ViT conversion measured offline (docs/vision.md): a small ViT trained here on Fashion-MNIST is the teacher;
it is converted to the learned-kernel attention with and without attention transfer, and to the fixed map elu + 1
(the "fixed linearization"), each briefly fine-tuned at one budget; test accuracy per model and seed.

    python scripts/vision_posthoc.py --fashion_mnist_dir DIR --output_dir outputs/vision --seeds 0 1 2

DIR holds Debian's dataset-fashion-mnist files (`apt-get download dataset-fashion-mnist`, `dpkg -x`, then
usr/share/datasets/fashion-mnist). The teacher (a `ViTForImageClassification`, trained once, `--teacher_steps`) is
kept in OUTPUT/teacher and reused; per seed, each converted model is fine-tuned `--finetune_steps` steps with the
same batch and learning rate. Each result is appended to `--records` (JSON lines: model, seed, accuracy, settings,
wall time) as it finishes, a finished one is skipped when run again, and the table (mean ± sd over the seeds, share
of the teacher) is rewritten to `--table` from all the records. One torch thread (`OMP_NUM_THREADS=1`).
"""

import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import HfArgumentParser, Trainer, TrainingArguments, ViTConfig, ViTForImageClassification

import luna_hf
from luna_hf.image_sources import FASHION_MNIST_LABELS, fashion_mnist

MODELS = {  # name -> (conversion arguments, attention transfer steps), in table order
    "learned_kernel_no_transfer": (dict(attention="learned_kernel"), 0),
    "learned_kernel_transfer": (dict(attention="learned_kernel"), None),  # None: --transfer_steps
    "fixed_elu_plus_one": (dict(attention="learned_kernel", kernel_feature_map="elu_plus_one"), 0),
}
TITLES = {"teacher": "ViT (teacher, softmax)", "learned_kernel_no_transfer": "learned kernel, no transfer",
          "learned_kernel_transfer": "learned kernel, attention transfer",
          "fixed_elu_plus_one": "fixed map elu + 1 (no transfer: nothing to train)"}  # fmt: skip


@dataclass
class Arguments:
    fashion_mnist_dir: str = field(metadata={"help": "Folder with Fashion-MNIST's four *-ubyte.gz files."})
    output_dir: str = field(default="outputs/vision", metadata={"help": "Models (the teacher is reused)."})
    records: str = field(default="benchmarks/results/vision/fashion_mnist.jsonl")
    table: str = field(default="benchmarks/results/vision/table.md")
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    teacher_steps: int = field(default=3000, metadata={"help": "Training steps of the ViT teacher."})
    finetune_steps: int = field(default=300, metadata={"help": "Fine-tuning steps of every converted model."})
    transfer_steps: int = field(default=300, metadata={"help": "Attention transfer steps (on unlabelled images)."})
    batch_size: int = 64
    teacher_learning_rate: float = 1e-3
    finetune_learning_rate: float = 2e-4
    transfer_learning_rate: float = 1e-2
    kernel_num_projections: int = 16


class Images(torch.utils.data.Dataset):
    """Fashion-MNIST as the Trainer reads it: pixel values scaled to [-1, 1], one channel."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.pixels = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0).unsqueeze(1)
        self.labels = torch.from_numpy(labels.astype(np.int64))

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return {"pixel_values": self.pixels[index], "labels": self.labels[index]}


def training_arguments(args: Arguments, output_dir: Path, steps: int, learning_rate: float, seed: int):
    return TrainingArguments(
        output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=256, learning_rate=learning_rate, warmup_steps=0.1, weight_decay=0.05,
        lr_scheduler_type="cosine", save_strategy="no", report_to=[], seed=seed, logging_steps=max(1, steps // 10),
        use_cpu=True, disable_tqdm=True,
    )  # fmt: skip


def accuracy(model, dataset, args: Arguments) -> float:
    trainer = Trainer(model=model, args=training_arguments(args, Path(args.output_dir) / "eval", 1, 1e-4, 0))
    output = trainer.predict(dataset)
    return float((output.predictions.argmax(-1) == output.label_ids).mean())


def teacher(args: Arguments, data: dict) -> ViTForImageClassification:
    """A ViT for 28x28 grey images (patches of 4: 49 tokens and [CLS]), trained once and kept."""
    folder = Path(args.output_dir) / "teacher"
    if (folder / "config.json").is_file():
        return ViTForImageClassification.from_pretrained(folder).eval()
    config = ViTConfig(image_size=28, patch_size=4, num_channels=1, hidden_size=64, num_hidden_layers=4,
                       num_attention_heads=4, intermediate_size=128, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0, id2label=dict(enumerate(FASHION_MNIST_LABELS)),
                       label2id={name: index for index, name in enumerate(FASHION_MNIST_LABELS)})  # fmt: skip
    torch.manual_seed(0)
    model = ViTForImageClassification(config)
    arguments = training_arguments(args, folder, args.teacher_steps, args.teacher_learning_rate, seed=0)
    Trainer(model=model, args=arguments, train_dataset=data["train"]).train()
    model.save_pretrained(folder)
    return model.eval()


def converted(args: Arguments, name: str, source, data: dict, seed: int):
    """The converted model, its attention transferred where the recipe says, then fine-tuned."""
    conversion, transfer_steps = MODELS[name]
    transfer_steps = args.transfer_steps if transfer_steps is None else transfer_steps
    model = luna_hf.convert_to_luna(source, kernel_num_projections=args.kernel_num_projections, seed=seed, **conversion)
    if transfer_steps:
        order = torch.randperm(len(data["train"]), generator=torch.Generator().manual_seed(seed))
        images = data["train"].pixels[order]
        luna_hf.transfer_attention(model, source, images[: transfer_steps * args.batch_size],
                                   max_steps=transfer_steps, batch_size=args.batch_size,
                                   learning_rate=args.transfer_learning_rate, seed=seed)  # fmt: skip
    folder = Path(args.output_dir) / f"{name}-seed{seed}"
    arguments = training_arguments(args, folder, args.finetune_steps, args.finetune_learning_rate, seed)
    Trainer(model=model.train(), args=arguments, train_dataset=data["train"]).train()
    return model.eval()


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def write_table(records: list[dict], path: Path) -> str:
    by_model = {}
    for record in records:
        by_model.setdefault(record["model"], {})[record["seed"]] = record["accuracy"]
    teacher_accuracy = statistics.mean(by_model["teacher"].values()) if "teacher" in by_model else None
    lines = ["| model | per seed (%) | mean ± sd (%) | of the teacher |", "|---|---|---:|---:|"]
    for model in [model for model in TITLES if model in by_model]:
        values = [by_model[model][seed] for seed in sorted(by_model[model])]
        per_seed = ", ".join(f"{seed}: {100 * by_model[model][seed]:.2f}" for seed in sorted(by_model[model]))
        spread = f" ± {100 * statistics.stdev(values):.2f}" if len(values) > 1 else ""
        share = f"{100 * statistics.mean(values) / teacher_accuracy:.1f}%" if teacher_accuracy else ""
        lines.append(f"| {TITLES[model]} | {per_seed} | {100 * statistics.mean(values):.2f}{spread} | {share} |")
    text = "\n".join(lines) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


def main(argv=None):
    (args,) = HfArgumentParser(Arguments).parse_args_into_dataclasses(argv)
    torch.set_num_threads(1)
    records_path = Path(args.records)
    records_path.parent.mkdir(parents=True, exist_ok=True)
    done = {(record["model"], record["seed"]) for record in read_records(records_path)}
    data = {split: Images(*arrays) for split, arrays in fashion_mnist(args.fashion_mnist_dir).items()}
    settings = {key: value for key, value in asdict(args).items() if key not in ("records", "table", "seeds")}

    def record(model_name, seed, model, started):
        result = {"model": model_name, "seed": seed, "accuracy": accuracy(model, data["test"], args),
                  "wall_seconds": round(time.time() - started), "settings": settings}  # fmt: skip
        with open(records_path, "a") as handle:
            handle.write(json.dumps(result) + "\n")
        print(f"{model_name} seed {seed}: test accuracy {100 * result['accuracy']:.2f}%", flush=True)

    started = time.time()
    source = teacher(args, data)
    if ("teacher", 0) not in done:
        record("teacher", 0, source, started)
    for seed in args.seeds:
        for name in MODELS:
            if (name, seed) not in done:
                started = time.time()
                record(name, seed, converted(args, name, source, data, seed), started)
    print(write_table(read_records(records_path), Path(args.table)), end="")


if __name__ == "__main__":
    main()

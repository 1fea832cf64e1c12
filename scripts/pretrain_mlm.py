#!/usr/bin/env python
"""Pretrain Luna (or a same-size RoBERTa) with masked language modelling, driven by accelerate.

Shaped like transformers' `examples/pytorch/language-modeling/run_mlm_no_trainer.py`, with its argument names, plus
model presets, tokenizer training, atomic checkpoints with exact resume and long blocks. One process:

    python scripts/pretrain_mlm.py --preset luna-small --train_tokenizer --vocab_size 8192 \
        --train_file data/corpus/train.txt --validation_file data/corpus/validation.txt \
        --max_seq_length 128 --max_train_steps 600 --output_dir outputs/luna-small

Several GPUs or machines: the same arguments after
`accelerate launch --config_file scripts/accelerate_configs/multi_gpu.yaml`. See docs/pretraining.md.
"""

import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from itertools import chain
from pathlib import Path
from typing import Literal

import datasets
import torch
import torch.nn.functional as F
import transformers
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs, InitProcessGroupKwargs
from accelerate.logging import get_logger
from accelerate.utils import DistributedType, gather_object, set_seed
from datasets import load_dataset
from tokenizers import AddedToken, ByteLevelBPETokenizer
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoModelForMaskedLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    HfArgumentParser,
    RobertaTokenizer,
    get_scheduler,
)
from transformers.trainer_pt_utils import get_parameter_names

import luna_hf  # noqa: F401  (registers "luna" with the Auto classes)
from luna_hf.model_card import write_model_card
from luna_hf.transformers_compat import enable_activation_checkpointing

logger = get_logger(__name__)

# Model sizes. luna-base is the paper's Table 8 model; luna-small runs on a 2-core CPU (a pipeline check).
PRESETS = {
    "luna-base": dict(
        num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072, projected_length=128
    ),
    "luna-small": dict(
        num_hidden_layers=4, hidden_size=256, num_attention_heads=4, intermediate_size=1024, projected_length=32
    ),
}
DATA_EXTENSIONS = {"txt": "text", "json": "json", "jsonl": "json", "csv": "csv", "parquet": "parquet"}
SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # RoBERTa's ids: bos 0, pad 1, eos 2, unk 3
STATE_FILE = "training_state.json"


@dataclass
class Arguments:
    output_dir: str = field(metadata={"help": "Final model, tokenizer, checkpoints/, logs and TensorBoard events."})
    # Data
    dataset_name: str | None = field(default=None, metadata={"help": "A dataset on the Hub (needs network)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Its configuration name."})
    train_file: str | None = field(default=None, metadata={"help": "A txt/json/jsonl/csv/parquet training file."})
    validation_file: str | None = field(default=None, metadata={"help": "The same for validation."})
    validation_split_percentage: float = field(
        default=5, metadata={"help": "Share of the training data held out when there is no validation split."}
    )
    streaming: bool = field(default=False, metadata={"help": "Stream the data instead of preparing it on disk."})
    streaming_validation_examples: int = field(
        default=1000, metadata={"help": "With --streaming and no validation split: raw examples held out."}
    )
    text_column_name: str | None = field(default=None, metadata={"help": "Default: `text`, else the first column."})
    max_seq_length: int = field(default=512, metadata={"help": "Tokens per training block."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on at most this many blocks."})
    mlm_probability: float = field(default=0.15, metadata={"help": "Share of tokens masked (80/10/10)."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for datasets.map."})
    # Tokenizer and model
    model_type: Literal["luna", "roberta"] = field(default="luna", metadata={"help": "Architecture to train."})
    preset: Literal["luna-base", "luna-small"] | None = field(
        default=None, metadata={"help": "Model size when training from scratch (default luna-base)."}
    )
    config_overrides: str | None = field(
        default=None, metadata={"help": 'Config changes, e.g. "num_hidden_layers=6,projected_length=64".'}
    )
    config_name: str | None = field(default=None, metadata={"help": "A config folder or Hub id instead of a preset."})
    model_name_or_path: str | None = field(default=None, metadata={"help": "Continue training this model."})
    tokenizer_name: str | None = field(default=None, metadata={"help": "A tokenizer folder or Hub id."})
    train_tokenizer: bool = field(default=False, metadata={"help": "Train a byte-level BPE on the training text."})
    vocab_size: int = field(default=8192, metadata={"help": "Vocabulary size for --train_tokenizer."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations to save memory."})
    sparse_prediction: bool = field(
        default=True, metadata={"help": "Luna: the MLM head runs only on the masked tokens (the same loss, faster)."}
    )
    normalize_before: bool | None = field(
        default=None,
        metadata={
            "help": "Luna from scratch: pre-LayerNorm layers (LunaConfig.normalize_before). Default: True with a "
            "--preset (the paper's post-LN Luna collapses at learning rates where RoBERTa trains, see "
            "docs/pretraining.md), the --config_name's own setting otherwise. False: the post-LN model of the "
            "paper and of the authors' checkpoints."
        },
    )
    attention_type: Literal["nested", "learned_kernel"] | None = field(
        default=None,
        metadata={"help": "Luna from scratch: LunaConfig.attention_type (default: the preset's or config's, nested)."},
    )
    # Optimisation (defaults: the paper's Table 8)
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 6e-4
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    adam_epsilon: float = 1e-6
    max_grad_norm: float = 1.0
    lr_scheduler_type: str = "linear"
    num_warmup_steps: int | None = field(default=None, metadata={"help": "Default: 6%% of the training steps."})
    num_train_epochs: int = 1
    max_train_steps: int | None = field(default=None, metadata={"help": "Overrides --num_train_epochs."})
    mixed_precision: Literal["no", "fp16", "bf16"] | None = field(
        default=None, metadata={"help": "Default: whatever `accelerate launch`/`accelerate config` says."}
    )
    seed: int = 42
    ddp_timeout: int = field(
        default=1800, metadata={"help": "Seconds a process waits for the others in a collective before it fails."}
    )
    # Checkpoints, logging, evaluation, output
    checkpointing_steps: int | None = field(default=None, metadata={"help": "Save the full state every N steps."})
    checkpoints_total_limit: int | None = field(default=None, metadata={"help": "Keep only the newest N."})
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "A checkpoint folder, or `latest` (the newest in output_dir/checkpoints)."}
    )
    logging_steps: int = 10
    eval_steps: int | None = field(default=None, metadata={"help": "Evaluate every N steps (and always at the end)."})
    with_tracking: bool = field(default=False, metadata={"help": "Log to --report_to (default tensorboard)."})
    report_to: str | None = field(default=None, metadata={"help": "tensorboard, wandb, ... (implies tracking)."})
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_token: str | None = None

    def __post_init__(self):
        if not (self.dataset_name or self.train_file):
            raise ValueError("Pass --dataset_name or --train_file.")
        for path in (self.train_file, self.validation_file):
            if path is None:
                continue
            if Path(path).suffix.lstrip(".") not in DATA_EXTENSIONS:
                raise ValueError(f"{path}: data files must end in one of {sorted(DATA_EXTENSIONS)}.")
            if not Path(path).is_file():
                raise FileNotFoundError(f"{path}: no such file.")
        if not (self.tokenizer_name or self.train_tokenizer or self.model_name_or_path):
            raise ValueError("Pass --tokenizer_name, --model_name_or_path, or --train_tokenizer --vocab_size N.")
        if self.train_tokenizer and self.streaming:
            raise ValueError(
                "--train_tokenizer reads the whole training split; with --streaming pass --tokenizer_name."
            )
        if self.streaming and self.max_train_steps is None:
            raise ValueError("--streaming data has no length: pass --max_train_steps.")
        if self.normalize_before is not None and (self.model_type != "luna" or self.model_name_or_path):
            raise ValueError(
                "--normalize_before chooses the layers of a Luna trained from scratch; RoBERTa and a model given by "
                "--model_name_or_path keep their own."
            )
        if self.report_to == "none":
            self.report_to, self.with_tracking = None, False
        elif self.report_to or self.with_tracking:
            self.report_to, self.with_tracking = self.report_to or "tensorboard", True


def load_raw_datasets(args: Arguments):
    """The raw text as a DatasetDict (IterableDatasetDict with --streaming) with `train` and `validation`."""
    if args.dataset_name:
        raw = load_dataset(args.dataset_name, args.dataset_config_name, streaming=args.streaming)
    else:
        data_files = {"train": args.train_file}
        if args.validation_file:
            data_files["validation"] = args.validation_file
        builder = DATA_EXTENSIONS[Path(args.train_file).suffix.lstrip(".")]
        raw = load_dataset(builder, data_files=data_files, streaming=args.streaming)
    if "validation" not in raw:
        if args.streaming:
            raw["validation"] = raw["train"].take(args.streaming_validation_examples)
            raw["train"] = raw["train"].skip(args.streaming_validation_examples)
        else:
            split = raw["train"].train_test_split(test_size=args.validation_split_percentage / 100, seed=args.seed)
            raw["train"], raw["validation"] = split["train"], split["test"]
    return raw


def train_bpe_tokenizer(texts, vocab_size: int, max_length: int) -> RobertaTokenizer:
    """A byte-level BPE trained with `tokenizers`, wrapped as RoBERTa's tokenizer (same special tokens and ids)."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS)
    model = json.loads(bpe._tokenizer.to_str())["model"]
    merges = [tuple(merge) if isinstance(merge, list) else tuple(merge.split(" ")) for merge in model["merges"]]
    return RobertaTokenizer(
        vocab=model["vocab"],
        merges=merges,
        mask_token=AddedToken("<mask>", lstrip=True, rstrip=False),  # as roberta-base: "a <mask>" masks " word"
        model_max_length=max_length,
    )


def load_tokenizer(args: Arguments, raw, text_column: str, accelerator: Accelerator):
    saved = Path(args.output_dir) / "tokenizer_config.json"
    if args.train_tokenizer and args.resume_from_checkpoint and saved.exists():
        return AutoTokenizer.from_pretrained(args.output_dir)  # the run's own tokenizer: ids must not change
    if not args.train_tokenizer:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name or args.model_name_or_path)
        if tokenizer.mask_token is None or tokenizer.pad_token is None:
            raise ValueError(f"{args.tokenizer_name or args.model_name_or_path}: MLM needs a mask and a pad token.")
        return tokenizer
    with accelerator.main_process_first():  # the main process trains and saves it, the others load that
        if accelerator.is_main_process:
            logger.info(f"Training a byte-level BPE tokenizer with {args.vocab_size} tokens")
            batches = (batch[text_column] for batch in raw["train"].iter(batch_size=1000))
            tokenizer = train_bpe_tokenizer(batches, args.vocab_size, args.max_seq_length)
            tokenizer.save_pretrained(args.output_dir)
        else:
            tokenizer = AutoTokenizer.from_pretrained(args.output_dir)
    return tokenizer


def build_model(args: Arguments, tokenizer):
    if args.model_name_or_path:
        model = AutoModelForMaskedLM.from_pretrained(args.model_name_or_path)
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tokenizer))
    else:
        if args.config_name:
            config = AutoConfig.from_pretrained(args.config_name)
        else:
            sizes = dict(PRESETS[args.preset or "luna-base"])
            if args.model_type == "roberta":  # the same size without Luna's P; one token type, eps as roberta-base
                sizes.pop("projected_length")
                sizes.update(type_vocab_size=1, layer_norm_eps=1e-5)
            config = AutoConfig.for_model(
                args.model_type, **sizes, max_position_embeddings=args.max_seq_length + tokenizer.pad_token_id + 1
            )
        if config.model_type == "luna" and (args.normalize_before is not None or not args.config_name):
            config.normalize_before = args.normalize_before is not False  # a preset: pre-LN unless told otherwise
        if config.model_type == "luna" and args.attention_type is not None:
            config.attention_type = args.attention_type
        config.update(
            dict(
                vocab_size=len(tokenizer),
                pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        )
        if args.config_overrides:
            config.update_from_string(args.config_overrides)
        model = AutoModelForMaskedLM.from_config(config)
    longest = model.config.max_position_embeddings - model.config.pad_token_id - 1
    if args.max_seq_length > longest:
        raise ValueError(f"--max_seq_length {args.max_seq_length} exceeds the model's {longest} positions.")
    if model.config.model_type == "luna":  # a training switch: `save_model` turns it off in the published config
        model.config.sparse_prediction = args.sparse_prediction
    if args.gradient_checkpointing:
        enable_activation_checkpointing(model, use_reentrant=False)
    return model


def group_texts(examples, block_size: int):
    """Concatenate the tokenized texts and cut them into full blocks (the remainder is dropped)."""
    concatenated = {key: list(chain(*values)) for key, values in examples.items()}
    total = len(concatenated["input_ids"]) // block_size * block_size
    return {key: [ids[i : i + block_size] for i in range(0, total, block_size)] for key, ids in concatenated.items()}


def tokenize_into_blocks(args: Arguments, raw, tokenizer, text_column: str, accelerator: Accelerator):
    def tokenize(examples):
        return tokenizer(examples[text_column], return_special_tokens_mask=True, verbose=False)

    def options(description):
        if args.streaming:
            return {}
        return {"num_proc": args.preprocessing_num_workers, "desc": description}

    columns = raw["train"].column_names or list(next(iter(raw["train"])).keys())
    with accelerator.main_process_first():
        tokenized = raw.map(tokenize, batched=True, remove_columns=columns, **options("Tokenizing"))
        blocks = tokenized.map(
            group_texts,
            batched=True,
            fn_kwargs={"block_size": args.max_seq_length},
            **options(f"Grouping into blocks of {args.max_seq_length}"),
        )
    train, validation = blocks["train"], blocks["validation"]
    if args.max_eval_samples is not None:
        validation = validation.take(args.max_eval_samples)
    if not args.streaming:
        for name, split in (("training", train), ("validation", validation)):
            if len(split) == 0:
                raise ValueError(
                    f"The {name} data holds fewer than {args.max_seq_length} tokens per map batch, so no block "
                    "could be built; give more text or lower --max_seq_length."
                )
        logger.info(f"{len(train)} training and {len(validation)} validation blocks of {args.max_seq_length} tokens")
    else:
        train = train.shuffle(seed=args.seed, buffer_size=10_000)
    return train, validation


class BlockSeededCollator:
    """Masks each block with a generator seeded by (seed, epoch, the block's tokens) instead of the global RNG.

    A block then gets the same mask wherever it lands: a resumed run masks as the uninterrupted one did (accelerate
    collates one batch ahead, and a resume never collates the batches it skips), and N processes with a per-device
    batch of B mask exactly as one process with a batch of N*B does.
    """

    def __init__(self, collator: DataCollatorForLanguageModeling, seed: int):
        self.collator, self.seed, self.epoch = collator, seed, 0
        self.collator.generator = torch.Generator()

    def __call__(self, examples):
        batches = []
        for example in examples:
            key = repr((self.seed, self.epoch, list(example["input_ids"]))).encode()
            self.collator.generator.manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:7], "little"))
            batches.append(self.collator([example]))
        return {name: torch.cat([batch[name] for batch in batches]) for name in batches[0]}


def without_global_rng(batches):
    """Iterate `batches` so that loading them never draws from the global RNG, which dropout uses.

    accelerate's dispatcher for streamed data draws a seed from it whenever an epoch's iteration starts; a resumed
    run starts iterating at another moment than an uninterrupted one, so such draws would shift later dropout masks.
    """
    iterator = iter(batches)
    while True:
        with torch.random.fork_rng(devices=[]):
            batch = next(iterator, None)
        if batch is None:
            return
        yield batch


def optimizer_for(args: Arguments, model) -> torch.optim.AdamW:
    """AdamW as in Table 8; biases and LayerNorm weights get no weight decay."""
    decay = {name for name in get_parameter_names(model, [torch.nn.LayerNorm]) if not name.endswith("bias")}
    groups = [
        {"params": [p for n, p in model.named_parameters() if n in decay], "weight_decay": args.weight_decay},
        {"params": [p for n, p in model.named_parameters() if n not in decay], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon
    )


COLLAPSE_SPREAD = 0.01  # a token-state spread below this: the final states no longer depend on the input (see docs)


@torch.no_grad()
def evaluate(model, dataloader, accelerator: Accelerator) -> dict:
    """MLM loss (per masked token), perplexity and masked-token accuracy on the validation blocks, and the spread of
    the final token states (`token_state_spread`, see `spread_of_states`), which warns when the model collapsed."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=accelerator.device)
    base = accelerator.unwrap_model(model).base_model
    # Over every real validation token: the sum of the final states, the sum of their squared norms, their count.
    moments = torch.zeros(base.config.hidden_size + 2, dtype=torch.float64, device=accelerator.device)
    last_states = []
    hook = base.register_forward_hook(lambda module, args, output: last_states.append(output[0].detach()))
    try:
        for batch in without_global_rng(dataloader):
            labels = batch.pop("labels")
            logits = model(**batch).logits.float()
            masked = labels != -100
            nll = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
            correct = (logits.argmax(-1) == labels) & masked
            per_row = torch.stack([nll.sum(1), masked.sum(1), correct.sum(1)], dim=1).double()
            totals += accelerator.gather_for_metrics(per_row).sum(0)
            states = last_states.pop().double()
            if "attention_mask" in batch:
                states = states[batch["attention_mask"].bool()]
            states = states.reshape(-1, states.shape[-1])
            moments += torch.cat([states.sum(0), states.pow(2).sum().view(1), moments.new_full((1,), len(states))])
    finally:
        hook.remove()
    model.train()
    loss = (totals[0] / totals[1].clamp(min=1)).item()
    spread = spread_of_states(*accelerator.reduce(moments, "sum").split([moments.numel() - 2, 1, 1]))
    if spread < COLLAPSE_SPREAD:
        logger.warning(
            f"The model has collapsed: its final token states barely differ (spread {spread:.2g} over the "
            f"validation tokens, below {COLLAPSE_SPREAD}), so they no longer depend on the input and the model "
            "cannot be finetuned; the MLM loss does not show this. Lower --learning_rate, or train Luna with "
            "pre-LayerNorm layers (--normalize_before True, the default with a --preset). See docs/pretraining.md."
        )
    return {
        "eval_loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "eval_accuracy": (totals[2] / totals[1]).item(),
        "token_state_spread": spread,
    }


def spread_of_states(total: torch.Tensor, squared_norms: torch.Tensor, count: torch.Tensor) -> float:
    """sqrt(mean ||h - mean h||^2) / sqrt(mean ||h||^2) of N states h, from their sum, sum of squared norms and N:
    0 when every state is the same vector (a collapsed model), near 1 when they share little."""
    count = count.clamp(min=1)
    mean_square = squared_norms / count
    variance = (mean_square - (total / count).pow(2).sum()).clamp(min=0)
    return (variance / mean_square.clamp(min=1e-30)).sqrt().item()


def checkpoints(output_dir: str) -> list[Path]:
    """Complete checkpoints, oldest first (partial saves live in `.tmp-*` folders and are never listed)."""
    folder = Path(output_dir) / "checkpoints"
    found = [path for path in folder.glob("step_*") if path.name[5:].isdigit()] if folder.is_dir() else []
    return sorted(found, key=lambda path: int(path.name[5:]))


def save_checkpoint(accelerator: Accelerator, args: Arguments, state: dict) -> None:
    """`accelerator.save_state` into a temporary folder, renamed once complete: a killed save leaves no checkpoint."""
    final = Path(args.output_dir) / "checkpoints" / f"step_{state['completed_steps']}"
    partial = final.with_name(f".tmp-{final.name}")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (partial / STATE_FILE).write_text(json.dumps(state))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        if args.checkpoints_total_limit:
            for old in checkpoints(args.output_dir)[: -args.checkpoints_total_limit]:
                shutil.rmtree(old)
        logger.info(f"Saved checkpoint {final}")
    accelerator.wait_for_everyone()


def batch_geometry(args: Arguments, accelerator: Accelerator) -> dict:
    """What fixes the data order and the masks: a resume with other values would silently train on other batches."""
    return {
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "num_processes": accelerator.num_processes,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "max_seq_length": args.max_seq_length,
        "seed": args.seed,
    }


def load_checkpoint(accelerator: Accelerator, args: Arguments) -> dict | None:
    """Restore model, optimizer, scheduler and RNG states; return the saved step counters (None: start afresh)."""
    found = checkpoints(args.output_dir)
    if args.resume_from_checkpoint == "latest":
        if not found:
            logger.info(f"No checkpoint in {args.output_dir}/checkpoints yet: starting from scratch")
            return None
        path = found[-1]
    else:
        path = Path(args.resume_from_checkpoint)
    state = json.loads((path / STATE_FILE).read_text()) if (path / STATE_FILE).is_file() else {}
    saved, current = state.get("geometry", {}), batch_geometry(args, accelerator)
    changed = [f"{key} {saved[key]} -> {value}" for key, value in current.items() if saved.get(key, value) != value]
    if changed:
        raise ValueError(
            f"Checkpoint {path} was saved by a run with other batches ({', '.join(changed)}); resuming with them "
            "would change the data order. Resume with the checkpoint's values (launch as many processes as it had), "
            "or start a new run in another --output_dir."
        )
    earlier = [str(candidate) for candidate in found if candidate.resolve() != path.resolve()]
    try:
        if not state:
            raise FileNotFoundError(f"{STATE_FILE} is missing, so the save did not finish")
        accelerator.load_state(str(path))
    except Exception as error:
        hint = f" The previous checkpoint is {earlier[-1]}: pass it to --resume_from_checkpoint." if earlier else ""
        raise RuntimeError(f"Checkpoint {path} is corrupt or incomplete ({error}).{hint}") from error
    logger.info(f"Resumed from {path} at step {state['completed_steps']}")
    return state


def is_peer_failure(error: RuntimeError) -> bool:
    """gloo and NCCL report a dead or hung peer as a DistError, or (in DDP's backward) a RuntimeError naming them."""
    return isinstance(error, torch.distributed.DistError) or any(word in str(error) for word in ("gloo", "NCCL"))


def out_of_memory_message(args: Arguments, last_checkpoint: Path | None) -> str:
    return (
        f"Out of memory in a training step of {args.per_device_train_batch_size} x {args.max_seq_length} tokens per "
        "process. Lower --max_seq_length or --per_device_train_batch_size, or add --gradient_checkpointing: on a "
        "23.5 GiB machine base-size Luna-16 trains 36,864 tokens at batch 1 without it and 65,536 with it "
        "(benchmarks/results/max_length.md). `python scripts/benchmark.py --max_length_search --search_models "
        "luna-16 luna-16-checkpointing` finds the longest length that fits this machine. The last complete "
        f"checkpoint is {last_checkpoint or 'none'}."
    )


def make_accelerator(args: Arguments) -> Accelerator:
    """accelerate's Accelerator; several launched processes without a GPU form one gloo data-parallel job.

    Launched by `torchrun` or `accelerate launch --multi_gpu` on a machine without CUDA, accelerate would otherwise
    run N independent copies that all write the same output folder.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    on_cpu = launched > 1 and not torch.cuda.is_available()
    if on_cpu and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        raise SystemExit(
            "FSDP was requested, but there is no GPU: accelerate applies FSDP on GPUs only and would silently run "
            "plain DDP on CPU. Launch with scripts/accelerate_configs/multi_gpu.yaml (DDP, works on CPU) or use GPUs."
        )
    accelerator = Accelerator(
        cpu=on_cpu,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=args.report_to,
        project_dir=args.output_dir,
        step_scheduler_with_optimizer=False,
        # The shuffling order is a function of (seed, epoch), so a resumed run sees the same batches.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        kwargs_handlers=[
            # Luna's last layer updates P, which the MLM head never reads: DDP must expect parameters without grad.
            DistributedDataParallelKwargs(find_unused_parameters=args.model_type == "luna"),
            InitProcessGroupKwargs(timeout=timedelta(seconds=args.ddp_timeout)),
        ],
    )
    if accelerator.num_processes != launched:
        raise SystemExit(
            f"{launched} processes were launched but accelerate formed a job of {accelerator.num_processes} "
            f"({accelerator.distributed_type}); they would train {launched} separate copies. Launch with torchrun "
            "or `accelerate launch --multi_gpu --num_processes N` (on CPU too), or run one process."
        )
    return accelerator


def prepare_data(args: Arguments, accelerator: Accelerator):
    """Tokenizer, training and validation dataloaders (blocks of --max_seq_length tokens, masked per block)."""
    raw = load_raw_datasets(args)
    columns = raw["train"].column_names or list(next(iter(raw["train"])).keys())
    text_column = args.text_column_name or ("text" if "text" in columns else columns[0])
    tokenizer = load_tokenizer(args, raw, text_column, accelerator)
    tokenizer.model_max_length = args.max_seq_length
    train_dataset, eval_dataset = tokenize_into_blocks(args, raw, tokenizer, text_column, accelerator)

    def collator():
        return BlockSeededCollator(DataCollatorForLanguageModeling(tokenizer, args.mlm_probability), args.seed)

    train_dataloader = DataLoader(
        train_dataset,
        shuffle=not args.streaming,
        collate_fn=collator(),
        batch_size=args.per_device_train_batch_size,
    )
    eval_dataloader = DataLoader(eval_dataset, collate_fn=collator(), batch_size=args.per_device_eval_batch_size)
    return tokenizer, train_dataloader, eval_dataloader


def log_record(args: Arguments, accelerator: Accelerator, record: dict) -> None:
    """One line of log_history.jsonl (main process), the console, and the trackers."""
    if accelerator.is_local_main_process:
        tqdm.write(json.dumps(record))
    if accelerator.is_main_process:
        with open(Path(args.output_dir) / "log_history.jsonl", "a") as file:
            file.write(json.dumps(record) + "\n")
    if args.with_tracking:
        accelerator.log({key: value for key, value in record.items() if key != "step"}, step=record["step"])


def train(args, accelerator, model, optimizer, lr_scheduler, train_dataloader, eval_dataloader, state) -> None:
    """The training loop: runs until state["completed_steps"] reaches --max_train_steps; updates `state` in place."""
    progress = tqdm(
        total=args.max_train_steps, initial=state["completed_steps"], disable=not accelerator.is_local_main_process
    )
    # This process's summed loss over masked tokens and its masked tokens since the last log; tokens of all processes.
    # Kept on the device: reading it back every step would make the GPU wait for each step to finish.
    window, window_start = torch.zeros(2, dtype=torch.float64, device=accelerator.device), time.perf_counter()
    step_tokens = window_tokens = 0

    def log(record: dict) -> None:
        log_record(args, accelerator, {"step": state["completed_steps"], **record})

    model.train()
    while state["completed_steps"] < args.max_train_steps:
        train_dataloader.set_epoch(state["epoch"])
        train_dataloader.collate_fn.epoch = state["epoch"]
        batches = train_dataloader
        if state["batches_in_epoch"]:
            batches = accelerator.skip_first_batches(train_dataloader, state["batches_in_epoch"])
        for batch in without_global_rng(batches):
            state["batches_in_epoch"] += 1
            with accelerator.accumulate(model):
                masked_here = (batch["labels"] != -100).sum()
                masked_everywhere = accelerator.reduce(masked_here, "sum")
                loss = model(**batch).loss
                # DDP averages the processes' gradients; weighting each process's mean loss by its share of the
                # masked tokens makes the step the mean over every masked token of the global batch, as one process
                # with the whole batch computes it.
                accelerator.backward(loss * (masked_here * accelerator.num_processes / masked_everywhere))
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
                    lr_scheduler.step()
                optimizer.zero_grad()
            window += torch.stack([loss.detach().double() * masked_here, masked_here.double()])
            step_tokens += batch["input_ids"].numel() * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            state["completed_steps"] += 1
            state["tokens_seen"] += step_tokens
            window_tokens, step_tokens = window_tokens + step_tokens, 0
            progress.update(1)
            step = state["completed_steps"]
            if step % args.logging_steps == 0 or step == args.max_train_steps:
                loss_sum, masked = accelerator.reduce(window, "sum").tolist()
                elapsed = time.perf_counter() - window_start
                log(
                    {
                        "train_loss": loss_sum / max(masked, 1),
                        "learning_rate": lr_scheduler.get_last_lr()[0],
                        "tokens_per_second": window_tokens / elapsed,
                        "tokens_seen": state["tokens_seen"],
                        "epoch": state["epoch"],
                    }
                )
                progress.set_postfix(loss=f"{loss_sum / max(masked, 1):.3f}")
                window.zero_()
                window_start, window_tokens = time.perf_counter(), 0
            if args.eval_steps and step % args.eval_steps == 0 and step < args.max_train_steps:
                log(evaluate(model, eval_dataloader, accelerator))
            if args.checkpointing_steps and step % args.checkpointing_steps == 0:
                save_checkpoint(accelerator, args, state)
            if step >= args.max_train_steps:
                break
        if state["batches_in_epoch"] == 0:
            raise ValueError("The training data yielded no batch.")
        if state["completed_steps"] < args.max_train_steps:  # the epoch ran out: start the next one
            state["epoch"] += 1
            state["batches_in_epoch"] = 0
    progress.close()


def weights_fingerprint(model) -> str:
    """sha256 of the model's tensors in name order (tied tensors once): equal on every process after a DDP step."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode() + tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_replicas_agree(accelerator: Accelerator, model) -> str:
    """With DDP every process holds the whole model, and the main process writes it: prove they hold the same one."""
    fingerprint = weights_fingerprint(accelerator.unwrap_model(model))
    fingerprints = gather_object([fingerprint])
    if len(set(fingerprints)) > 1:
        raise RuntimeError(f"The processes' weights differ after training ({fingerprints}); nothing was saved.")
    logger.info(f"Weights identical on all {len(fingerprints)} processes (sha256 {fingerprint})")
    return fingerprint


def write_card(args, model, results: dict) -> None:
    """README.md of the saved folder (pushed as is with --push_to_hub)."""
    config = model.config
    source = f"the local file `{Path(args.train_file).name}`" if args.train_file else f"`{args.dataset_name}`"
    size = f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, {model.num_parameters() / 1e6:.2f}M"
    write_model_card(
        args.output_dir, config=config, script="scripts/pretrain_mlm.py", load_class="AutoModelForMaskedLM",
        title=f"{Path(args.output_dir).name}: a {config.model_type} masked language model",
        summary=f"A {config.model_type} encoder ({size} parameters) pretrained from random weights with masked "
                f"language modelling ({args.mlm_probability:.0%} of the tokens masked).",
        data=f"{results['tokens_seen']:,} tokens of {source}, in blocks of {args.max_seq_length} tokens, "
             f"{results['step']} optimizer steps at peak learning rate {args.learning_rate:g}; the metrics below are "
             f"on " + (f"`{Path(args.validation_file).name}`" if args.validation_file else "a held-out split") + ".",
        metrics={name: results[name] for name in ("eval_loss", "perplexity", "eval_accuracy") if name in results},
        limitations=[
            "Pretrained for the number of tokens above only: a few million tokens reach the unigram plateau of the MLM "
            "loss (about 7.5 nats with an 8K vocabulary), where predictions ignore the context; it is a pipeline "
            "check, not a language model, until trained far longer (the paper: 250k steps of 2K x 512 tokens).",
            "English only, and only as broad as its corpus; it carries that corpus's biases.",
            f"Inputs of at most {config.max_position_embeddings - config.pad_token_id - 1} tokens.",
        ],
        tags=("fill-mask",), pipeline_tag="fill-mask", datasets=[args.dataset_name] if args.dataset_name else None,
        task_type="fill-mask", dataset_name=args.dataset_name or Path(args.train_file).name,
        model_id=args.hub_model_id if args.push_to_hub and args.hub_model_id else None,
    )  # fmt: skip


def save_model(args, accelerator, model, tokenizer, results: dict) -> None:
    accelerator.wait_for_everyone()
    if accelerator.distributed_type != DistributedType.FSDP:  # FSDP shards the weights: no process holds them all
        results["weights_sha256"] = check_replicas_agree(accelerator, model)
    # Sparse prediction is a training switch: the published folder must give every position's logits with labels
    # too, as any masked LM does for downstream tools (transformers' run_mlm.py computes metrics on them).
    accelerator.unwrap_model(model).config.sparse_prediction = False
    accelerator.unwrap_model(model).save_pretrained(
        args.output_dir,
        is_main_process=accelerator.is_main_process,
        save_function=accelerator.save,
        state_dict=accelerator.get_state_dict(model),
    )
    if not accelerator.is_main_process:
        return
    tokenizer.save_pretrained(args.output_dir)
    (Path(args.output_dir) / "all_results.json").write_text(json.dumps(results, indent=2))
    write_card(args, accelerator.unwrap_model(model), results)
    logger.info(f"Saved the model and tokenizer to {args.output_dir}: {results}")
    if args.push_to_hub:
        from huggingface_hub import HfApi

        api = HfApi(token=args.hub_token)
        repo_id = api.create_repo(args.hub_model_id or Path(args.output_dir).name, exist_ok=True).repo_id
        api.upload_folder(
            repo_id=repo_id,
            folder_path=args.output_dir,
            ignore_patterns=["checkpoints/*"],
            commit_message="End of training",
        )
        logger.info(f"Pushed to https://huggingface.co/{repo_id}")


def main():
    (args,) = HfArgumentParser(Arguments).parse_args_into_dataclasses()
    accelerator = make_accelerator(args)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    logger.info(accelerator.state, main_process_only=False)
    if not accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
    set_seed(args.seed)
    os.makedirs(args.output_dir, exist_ok=True)

    # Data and model
    tokenizer, train_dataloader, eval_dataloader = prepare_data(args, accelerator)
    model = build_model(args, tokenizer)
    model_type, num_parameters = model.config.model_type, model.num_parameters()
    if args.max_train_steps is None:
        batches_per_process = math.ceil(len(train_dataloader) / accelerator.num_processes)
        args.max_train_steps = args.num_train_epochs * math.ceil(batches_per_process / args.gradient_accumulation_steps)
    if args.num_warmup_steps is None:
        args.num_warmup_steps = round(0.06 * args.max_train_steps)
    optimizer = optimizer_for(args, model)
    # The training loop steps the scheduler once per optimizer step (step_scheduler_with_optimizer=False).
    lr_scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer,
        num_warmup_steps=args.num_warmup_steps,
        num_training_steps=args.max_train_steps,
    )
    # One call, as DeepSpeed and FSDP need: the model, its optimizer and scheduler are wrapped together.
    model, optimizer, train_dataloader, eval_dataloader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, eval_dataloader, lr_scheduler
    )
    if args.with_tracking:
        hparams = {
            key: value if isinstance(value, int | float | str | bool) else str(value)
            for key, value in asdict(args).items()
        }
        hparams.pop("hub_token")
        accelerator.init_trackers("tensorboard", config=hparams)

    # Train
    state = {"completed_steps": 0, "epoch": 0, "batches_in_epoch": 0, "tokens_seen": 0}
    if args.resume_from_checkpoint:
        state = load_checkpoint(accelerator, args) or state
    state["geometry"] = batch_geometry(args, accelerator)
    total_batch = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(
        f"***** Training {model_type}: {num_parameters / 1e6:.1f}M parameters, {args.max_train_steps} steps of "
        f"{total_batch} blocks x {args.max_seq_length} tokens on {accelerator.num_processes} process(es) *****"
    )
    train_start = time.perf_counter()
    try:
        train(args, accelerator, model, optimizer, lr_scheduler, train_dataloader, eval_dataloader, state)
    except RuntimeError as error:  # torch.OutOfMemoryError and torch.distributed.DistError are ones
        last = checkpoints(args.output_dir)
        if isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error):
            raise SystemExit(out_of_memory_message(args, last[-1] if last else None)) from error
        if accelerator.num_processes == 1 or not is_peer_failure(error):
            raise
        raise SystemExit(
            f"Process {accelerator.process_index}: another process of the job failed or stopped answering ({error}). "
            f"Stopping. The last complete checkpoint is {last[-1] if last else 'none'}: relaunch all processes with "
            "--resume_from_checkpoint latest."
        ) from error
    train_runtime = time.perf_counter() - train_start

    # Evaluate and save
    metrics = evaluate(model, eval_dataloader, accelerator)
    log_record(args, accelerator, {"step": state["completed_steps"], **metrics})
    if args.with_tracking:
        accelerator.end_training()
    results = {
        **metrics,
        "train_runtime": train_runtime,
        "tokens_seen": state["tokens_seen"],
        "step": state["completed_steps"],
    }
    save_model(args, accelerator, model, tokenizer, results)


if __name__ == "__main__":
    main()

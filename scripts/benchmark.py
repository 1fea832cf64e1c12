#!/usr/bin/env python
"""Speed and peak memory of Luna against RoBERTa (SDPA and eager), Longformer, BigBird, Nyströmformer and the
attention-free floor, all at the same width, depth and FFN size (paper Table 2, with today's baselines):

    python scripts/benchmark.py --lengths 128 512 1024 2048 4096 8192 16384 --batch_size 1 \
        --output_dir benchmarks/results

For every length, model and mode (`train`: forward, backward and AdamW step of a sequence classifier;
`inference`: forward under `torch.inference_mode`) one configuration runs in a fresh process. It times `--repeats`
steps after `--warmup` untimed ones (fewer when they take more than `--measure_seconds`, never fewer than
`--min_repeats`) and reports the median: steps/s, tokens/s, and the peak memory growth over the built model (peak
RSS on CPU, `torch.cuda.max_memory_allocated` on GPU). A configuration that runs out of `--memory_limit_gb` or of
`--time_limit` seconds is recorded as `oom` / `timeout`, and the model's longer lengths as `skipped`, as are lengths
where the last step time, scaled linearly in the length, already cannot fit the time limit.

Writes `<prefix>results.csv`, `<prefix>results.md` (ratios against RoBERTa-SDPA with attention dropout 0.1 in the
layout of Table 2, absolute numbers, the targets) and log-log plots `<prefix>{train,inference}.png` (needs
matplotlib). `--max_length_search` estimates the longest sequence a base-size Luna-16 trains on at batch 1 within the
machine's memory; `--profile MODEL` writes a torch.profiler table of its training step; `--sparse_mlm` times
LunaForMaskedLM pretraining steps with the MLM head on every token and on the masked ones only (`sparse_mlm.md`).
See docs/benchmarks.md.
"""

import csv
import ctypes
import gc
import json
import math
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm
from transformers import (
    BigBirdConfig,
    BigBirdForSequenceClassification,
    HfArgumentParser,
    LongformerConfig,
    LongformerForSequenceClassification,
    ModernBertConfig,
    ModernBertForSequenceClassification,
    NystromformerConfig,
    NystromformerForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from luna_hf import LunaConfig, LunaForMaskedLM, LunaForSequenceClassification
from luna_hf.measurement import SIZES
from luna_hf.transformers_compat import enable_activation_checkpointing

# name -> (family, settings). Attention dropout is 0.1 unless the name says otherwise; hidden dropout is 0.1 for all.
MODELS = {
    **{f"luna-{length}{suffix}": ("luna", dict(projected_length=length, attn_implementation=attn))
       for length in (16, 128, 256) for suffix, attn in (("", "sdpa"), ("-eager", "eager"))},
    # luna-16 recomputing each layer's activations in the backward pass: memory for time (not part of the targets).
    "luna-16-checkpointing": ("luna", dict(gradient_checkpointing=True)),
    # The learned-kernel linear attention (Shahbazi et al., 2025) in the same Luna model: no P, default feature map.
    "learned-kernel": ("luna", dict(attention_type="learned_kernel")),
    "roberta-sdpa": ("roberta", dict(attn_implementation="sdpa")),
    "roberta-sdpa-nodrop": ("roberta", dict(attn_implementation="sdpa", attention_probs_dropout_prob=0.0)),
    "roberta-eager": ("roberta", dict(attn_implementation="eager")),
    "roberta-eager-nodrop": ("roberta", dict(attn_implementation="eager", attention_probs_dropout_prob=0.0)),
    "longformer": ("longformer", dict(attention_window=512)),
    # transformers' ModernBERT as shipped: 128-token sliding-window attention, global attention every third layer,
    # rotary positions, GeGLU feed-forward (unpadding needs flash-attention, so none on a CPU).
    "modernbert": ("modernbert", dict(attn_implementation="sdpa")),
    "bigbird": ("bigbird", dict(attention_type="block_sparse", block_size=64, num_random_blocks=3)),
    "nystromformer": ("nystromformer", dict(num_landmarks=64, conv_kernel_size=65)),
    "floor": ("floor", dict(attn_implementation="sdpa")),
    # FlexAttention compiles a kernel for the GPU; run it there only (see scripts/gpu_run.py).
    "roberta-flex": ("roberta", dict(attn_implementation="flex_attention")),
}
GPU_ONLY = {"roberta-flex"}
BASELINE, FLOOR, LUNA_TARGET = "roberta-sdpa", "floor", "luna-16"
# --sparse_mlm: scripts/pretrain_mlm.py's presets with real vocabularies -> (size, projected length, vocabulary).
MLM_PRESETS = {"luna-small": ("small", 32, 8192), "luna-base": ("base", 128, 50265),
               "luna-base-16": ("base", 16, 50265)}
MODES = ("train", "inference")
STATUS_SHORT = {"oom": "OOM", "timeout": "time", "skipped": "—", "error": "err", "crashed": "crash"}
CSV_FIELDS = ["device", "size", "model", "mode", "seq_len", "batch_size", "status", "steps_per_s", "tokens_per_s",
              "median_s", "repeats", "peak_mem_mib", "peak_rss_mib", "gflop", "error"]
CHILD_PRELOAD = ["torch", "transformers", "luna_hf", "__main__"]


@dataclass
class BenchmarkArguments:
    lengths: list[int] = field(default_factory=lambda: [128, 512, 1024, 2048, 4096, 8192, 16384],
                               metadata={"help": "Sequence lengths (tokens per row)."})
    batch_size: int = field(default=1, metadata={"help": "Rows per step, the same for every length."})
    size: str = field(default="small", metadata={"help": f"Model shape, one of {list(SIZES)} (base: for a GPU)."})
    models: list[str] = field(default_factory=lambda: [name for name in MODELS if name not in GPU_ONLY],
                              metadata={"help": f"Any of {list(MODELS)} (default: all but {sorted(GPU_ONLY)})."})
    modes: list[str] = field(default_factory=lambda: list(MODES), metadata={"help": "train and/or inference."})
    warmup: int = field(default=1, metadata={"help": "Untimed steps first (train: they also build AdamW state)."})
    repeats: int = field(default=20, metadata={"help": "Timed steps at most; the median is reported."})
    min_repeats: int = field(default=2, metadata={"help": "Timed steps at least."})
    measure_seconds: float = field(default=5.0, metadata={"help": "Stop timing after this long (>= min_repeats)."})
    time_limit: float = field(default=120.0, metadata={"help": "Seconds per configuration before it is killed."})
    memory_limit_gb: float = field(default=8.0, metadata={"help": "Memory growth allowed per configuration (GiB)."})
    vocab_size: int = field(default=512, metadata={"help": "Byte-level vocabulary, as in LRA Text."})
    threads: int = field(default=0, metadata={"help": "torch threads per configuration (0: torch's default)."})
    malloc_mmap_threshold: int = field(
        default=0, metadata={"help": "CPU: glibc mmap threshold in bytes for each configuration (0: glibc's dynamic "
                             "default). With e.g. 131072 every large block is returned to the OS when freed, so peak "
                             "RSS measures live memory, as max_memory_allocated does on CUDA (steps run slower)."})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, or auto (cuda when available)."})
    dtype: str = field(default="float32", metadata={"help": "float32, or bfloat16 (autocast, GPU)."})
    output_dir: str = field(default="benchmarks/results")
    prefix: str = field(default="", metadata={"help": "File name prefix; default '' on CPU, 'gpu_' on CUDA."})
    max_length_search: bool = field(default=False, metadata={"help": "Only find the longest base-size training "
                                                                       "length by real steps (max_length.md)."})
    search_models: list[str] = field(default_factory=lambda: ["luna-16", "luna-16-checkpointing", "roberta-sdpa"],
                                     metadata={"help": "Models for --max_length_search (any name + -checkpointing)."})
    search_start: int = field(default=4096, metadata={"help": "--max_length_search: first length; it doubles."})
    search_stop: int = field(default=131072, metadata={"help": "--max_length_search: longest length tried."})
    search_resolution: int = field(default=4096, metadata={"help": "--max_length_search: bisect to this many tokens."})
    search_size: str = field(default="base", metadata={"help": "--max_length_search: model shape."})
    search_memory_gb: float = field(default=0.0, metadata={"help": "--max_length_search: memory allowed per step "
                                                                    "(0: what the OS reports available)."})
    profile: str | None = field(default=None, metadata={"help": "Only profile this model's training step."})
    sparse_mlm: bool = field(default=False, metadata={"help": "Only time LunaForMaskedLM training steps, MLM head on "
                                                             "every token vs on the masked ones (sparse_mlm.md)."})
    mlm_presets: list[str] = field(default_factory=lambda: ["luna-small", "luna-base"],
                                   metadata={"help": f"Models for --sparse_mlm, any of {list(MLM_PRESETS)}."})
    profile_length: int = field(default=4096)
    deadline_seconds: float = field(default=0.0, metadata={"help": "Start no configuration (nor max-length try) after "
                                    "this many seconds from the start; the rest is recorded as skipped, and the "
                                    "reports are written (0: no deadline). scripts/gpu_run.py sets it."})

    def __post_init__(self):
        problems = [f"unknown model {name!r}" for name in self.models if name not in MODELS]
        problems += [f"unknown model {name!r}" for name in self.search_models
                     if name.removesuffix("-checkpointing") not in MODELS]
        problems += [f"unknown mode {mode!r}" for mode in self.modes if mode not in MODES]
        problems += [f"unknown MLM preset {name!r} (one of {list(MLM_PRESETS)})" for name in self.mlm_presets
                     if name not in MLM_PRESETS]
        problems += [f"unknown size {size!r}" for size in (self.size, self.search_size) if size not in SIZES]
        if self.profile is not None and self.profile not in MODELS:
            problems.append(f"unknown model to profile {self.profile!r}")
        if min(self.lengths + [self.search_start, self.search_resolution, self.batch_size]) < 1:
            problems.append("lengths and batch size must be positive")
        if not 1 <= self.min_repeats <= self.repeats or self.warmup < 0:
            problems.append("need 1 <= min_repeats <= repeats and warmup >= 0")
        if self.dtype not in ("float32", "bfloat16"):
            problems.append(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cuda" and not torch.cuda.is_available():
            problems.append("--device cuda but no GPU is visible")
        if problems:
            raise ValueError("Bad benchmark arguments: " + "; ".join(problems) + f". Models: {list(MODELS)}.")
        self.lengths = sorted(set(self.lengths))


class AttentionFree(nn.Module):
    """Stands in for a whole `RobertaAttention` block (Q/K/V/O projections, attention, dropout, residual LayerNorm):
    the layer's input goes straight to the feed-forward block, so each layer computes X <- LN(X + FFN(X))."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states, None


def build_model(name: str, size: str, seq_len: int, vocab_size: int) -> nn.Module:
    if name.endswith("-checkpointing"):
        model = build_model(name.removesuffix("-checkpointing"), size, seq_len, vocab_size)
        enable_activation_checkpointing(model, use_reentrant=False)
        return model
    family, settings = MODELS[name]
    common = dict(SIZES[size], vocab_size=vocab_size, num_labels=2, hidden_dropout_prob=0.1,
                  attention_probs_dropout_prob=0.1, pad_token_id=1)
    common.update(settings)
    # Learned positions for every model: RoBERTa-style tables are offset by pad_token_id + 1.
    if family == "luna":
        return LunaForSequenceClassification(LunaConfig(**common, max_position_embeddings=seq_len + 2))
    if family in ("roberta", "floor"):
        model = RobertaForSequenceClassification(
            RobertaConfig(**common, max_position_embeddings=seq_len + 2)
        )
        if family == "floor":
            for layer in model.roberta.encoder.layer:
                layer.attention = AttentionFree()
        return model
    if family == "modernbert":
        return build_modernbert(size, seq_len, vocab_size, settings)
    if family == "longformer":  # pads the input to a multiple of the window
        window = settings["attention_window"]
        padded = math.ceil(seq_len / window) * window
        return LongformerForSequenceClassification(
            LongformerConfig(**common, max_position_embeddings=padded + 2)
        )
    if family == "bigbird":  # block-sparse; BigBird itself switches to full attention up to 704 tokens
        return BigBirdForSequenceClassification(
            BigBirdConfig(**common, max_position_embeddings=seq_len + 2)
        )
    # Nyströmformer averages segments of `segment_means_seq_len // num_landmarks` tokens: the length is fixed.
    return NystromformerForSequenceClassification(
        NystromformerConfig(**common, max_position_embeddings=seq_len + 2, segment_means_seq_len=seq_len)
    )


def build_modernbert(size: str, seq_len: int, vocab_size: int, settings: dict) -> nn.Module:
    """ModernBERT of the same width, depth and heads. Its GeGLU feed-forward has three d x I matrices where the others
    have two d x FFN: I = 2/3 FFN gives it the same feed-forward parameters. Dropout 0.1 as for the others."""
    shape = SIZES[size]
    config = ModernBertConfig(
        vocab_size=vocab_size, hidden_size=shape["hidden_size"], num_hidden_layers=shape["num_hidden_layers"],
        num_attention_heads=shape["num_attention_heads"], intermediate_size=2 * shape["intermediate_size"] // 3,
        max_position_embeddings=seq_len, num_labels=2, attention_dropout=0.1, mlp_dropout=0.1, embedding_dropout=0.1,
        pad_token_id=1, bos_token_id=0, cls_token_id=0, eos_token_id=2, sep_token_id=2, **settings,
    )
    return ModernBertForSequenceClassification(config)


def proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} missing from /proc/self/status")


class MemoryMeter:
    """Peak memory growth over a baseline: resident set size on CPU (Linux), allocated tensors on CUDA. The limit is
    an address-space rlimit on CPU (an allocation beyond it fails) and a memory fraction on CUDA."""

    def __init__(self, device: torch.device, limit_bytes: int):
        self.cuda = device.type == "cuda"
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            self.baseline = torch.cuda.memory_allocated()
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, (self.baseline + limit_bytes) / total))
            torch.cuda.reset_peak_memory_stats()
        else:
            self.baseline = proc_status_bytes("VmRSS")
            address_space = proc_status_bytes("VmSize") + limit_bytes
            resource.setrlimit(resource.RLIMIT_AS, (address_space, resource.getrlimit(resource.RLIMIT_AS)[1]))
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")  # resets VmHWM (peak RSS) to the current RSS

    def peak(self) -> int:
        """Absolute peak (RSS or allocated bytes) since the meter started."""
        return torch.cuda.max_memory_allocated() if self.cuda else proc_status_bytes("VmHWM")


def is_out_of_memory(error: BaseException) -> bool:
    message = str(error).lower()
    return isinstance(error, (MemoryError, torch.OutOfMemoryError)) or any(
        text in message for text in ("can't allocate memory", "out of memory", "cannot allocate memory")
    )


def make_step(model: nn.Module, mode: str, batch: dict, dtype: str, device: torch.device):
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    if mode == "inference":
        model.eval()

        def step():
            with torch.inference_mode(), autocast:
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

        return step
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # Trainer's default (adamw_torch_fused)

    def step():
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def make_batch(args_dict: dict, seq_len: int, device: torch.device) -> dict:
    generator = torch.Generator().manual_seed(0)
    shape = (args_dict["batch_size"], seq_len)
    return {
        "input_ids": torch.randint(3, args_dict["vocab_size"], shape, generator=generator).to(device),
        "attention_mask": torch.ones(shape, dtype=torch.long, device=device),
        "labels": torch.randint(0, 2, (shape[0],), generator=generator).to(device),
    }


def run_configuration(args_dict: dict, name: str, mode: str, seq_len: int) -> dict:
    """Build one model and time one mode at one length; runs inside its own process."""
    transformers.logging.set_verbosity_error()
    if args_dict["threads"]:
        torch.set_num_threads(args_dict["threads"])
    if args_dict["malloc_mmap_threshold"]:
        ctypes.CDLL("libc.so.6").mallopt(-3, args_dict["malloc_mmap_threshold"])  # -3: M_MMAP_THRESHOLD
    torch.manual_seed(0)
    device = torch.device(args_dict["device"])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if mode == "mlm":
        return compare_mlm_heads(args_dict, name, seq_len, device, sync)
    model = build_model(name, args_dict["size"], seq_len, args_dict["vocab_size"]).to(device)
    batch = make_batch(args_dict, seq_len, device)
    torch.ones(64, 64, device=device) @ torch.ones(64, 64, device=device)  # start the thread pool before the meter
    meter = MemoryMeter(device, int(args_dict["memory_limit_gb"] * 2**30))
    step = make_step(model, mode, batch, args_dict["dtype"], device)
    for _ in range(args_dict["warmup"]):
        step()
    sync()
    times = []
    while len(times) < args_dict["repeats"] and (
        len(times) < args_dict["min_repeats"] or sum(times) < args_dict["measure_seconds"]
    ):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    peak = meter.peak()
    gflop = None
    if mode == "train":  # one more step: the FLOPs it counts, not its time
        with FlopCounterMode(display=False) as flop_counter:
            step()
        gflop = flop_counter.get_total_flops() / 1e9
    return dict(status="ok", median_s=median, steps_per_s=1 / median, gflop=gflop,
                tokens_per_s=args_dict["batch_size"] * seq_len / median, repeats=len(times),
                peak_mem_mib=(peak - meter.baseline) / 2**20, peak_rss_mib=peak / 2**20)


def compare_mlm_heads(args_dict: dict, name: str, seq_len: int, device: torch.device, sync) -> dict:
    """LunaForMaskedLM training steps on one model and batch (15% of the tokens labelled), the head on the labelled
    tokens (`sparse_prediction`) and on every token (dense) in turn. Peak memory growth: after the sparse warm-up,
    which runs first, and after every step (the dense one's, whose n x vocab logits are the larger)."""
    size, projected_length, vocab_size = MLM_PRESETS[name]
    config = LunaConfig(**SIZES[size], projected_length=projected_length, vocab_size=vocab_size,
                        max_position_embeddings=seq_len + 2)
    model = LunaForMaskedLM(config).to(device)
    batch = make_batch(dict(args_dict, vocab_size=vocab_size), seq_len, device)
    masked = torch.rand(batch["input_ids"].shape, generator=torch.Generator().manual_seed(1)).to(device) < 0.15
    batch["labels"] = torch.where(masked, batch["input_ids"], -100)
    torch.ones(64, 64, device=device) @ torch.ones(64, 64, device=device)
    meter = MemoryMeter(device, int(args_dict["memory_limit_gb"] * 2**30))
    step, times, peaks = make_step(model, "train", batch, args_dict["dtype"], device), {True: [], False: []}, {}
    for sparse in (True, False):
        model.config.sparse_prediction = sparse
        for _ in range(max(1, args_dict["warmup"])):
            step()
        sync()
        peaks[sparse] = meter.peak() - meter.baseline
    while len(times[False]) < args_dict["repeats"] and (
        len(times[False]) < args_dict["min_repeats"] or sum(times[True] + times[False]) < args_dict["measure_seconds"]
    ):
        for sparse in (True, False):
            model.config.sparse_prediction = sparse
            start = time.perf_counter()
            step()
            sync()
            times[sparse].append(time.perf_counter() - start)
    peaks[False] = meter.peak() - meter.baseline
    tokens = args_dict["batch_size"] * seq_len
    return dict(status="ok", repeats=len(times[False]), masked=int(masked.sum()),
                **{f"{variant}_{key}": value for variant, sparse in (("sparse", True), ("dense", False))
                   for key, value in (("median_s", statistics.median(times[sparse])),
                                      ("tokens_per_s", tokens / statistics.median(times[sparse])),
                                      ("peak_mem_mib", peaks[sparse] / 2**20))})


def child_main(connection, args_dict: dict, name: str, mode: str, seq_len: int):
    try:
        result = run_configuration(args_dict, name, mode, seq_len)
    except Exception as error:  # recorded, not raised: one failing configuration must not stop the benchmark
        status = "oom" if is_out_of_memory(error) else "error"
        result = dict(status=status, error=f"{type(error).__name__}: {str(error).splitlines()[0][:200]}")
    connection.send(result)


def configuration(args: BenchmarkArguments, name: str, mode: str, seq_len: int) -> dict:
    return dict(device=args.device, size=args.size, model=name, mode=mode, seq_len=seq_len, batch_size=args.batch_size)


def measure(context, args: BenchmarkArguments, name: str, mode: str, seq_len: int) -> dict:
    """Run one configuration in a fresh process with a time limit; never raises."""
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=child_main, args=(sender, asdict(args), name, mode, seq_len), daemon=True)
    process.start()
    sender.close()
    if receiver.poll(args.time_limit):
        try:
            result = receiver.recv()
        except EOFError:  # died while sending
            result = None
    else:
        result = None if not process.is_alive() else dict(status="timeout", error=f"over {args.time_limit:g} s")
    if process.is_alive():
        process.kill()
    process.join()
    if result is None:
        result = dict(status="crashed", error=f"process exit code {process.exitcode} (killed for memory?)")
    return dict(configuration(args, name, mode, seq_len), **result)


def new_context():
    # Children fork from a server that imported torch/transformers once (~5 s saved per configuration); each child
    # is still a fresh process with its own memory, limits and allocator state.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(CHILD_PRELOAD)
    return context


def run_benchmark(args: BenchmarkArguments, csv_path: Path) -> list[dict]:
    context = new_context()
    configurations = [(n, name, mode) for n in args.lengths for name in args.models for mode in args.modes]
    skip, rows = {}, []  # (model, mode) -> why its longer lengths are skipped
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        progress = tqdm(configurations, desc="benchmark", unit="config")
        for seq_len, name, mode in progress:
            progress.set_postfix_str(f"{name} {mode} {seq_len}")
            last = skip.get((name, mode))
            if past_deadline(args):
                last = dict(status="deadline", seq_len=seq_len)
            # Skip after a failure, or when the last step time, scaled linearly in the length, already cannot fit
            # warm-up plus min_repeats steps in the time limit.
            if last is not None and (last["status"] != "ok" or (args.warmup + args.min_repeats) * last["median_s"]
                                     * seq_len / last["seq_len"] > args.time_limit):
                why = (f"{last['status']} at {last['seq_len']}" if last["status"] != "ok" else
                       f"{last['median_s']:.1f} s/step at {last['seq_len']} predicts over {args.time_limit:g} s")
                row = dict(configuration(args, name, mode, seq_len), status="skipped", error=why)
            else:
                row = measure(context, args, name, mode, seq_len)
                skip[name, mode] = row
            rows.append(row)
            writer.writerow(row)
            handle.flush()
    return rows


def label(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def lookup(rows: list[dict]) -> dict:
    return {(row["model"], row["mode"], int(row["seq_len"])): row for row in rows}


def ratio_cell(row, base, key, digits=2):
    if row is None:
        return ""
    if row["status"] != "ok":
        return STATUS_SHORT.get(row["status"], row["status"])
    if base is None or base["status"] != "ok":
        return "n/a"
    return f"{float(row[key]) / float(base[key]):.{digits}f}"


def markdown_tables(rows: list[dict], args: BenchmarkArguments) -> str:
    table = lookup(rows)
    models = [name for name in MODELS if any(row["model"] == name for row in rows)]
    heads = [label(n) for n in args.lengths]
    lines = []
    for mode in args.modes:
        lines += [f"### {mode.capitalize()}: ratio to {BASELINE} (attention dropout 0.1)", "",
                  "| Model | " + " | ".join(f"steps/s {h}" for h in heads) + " | "
                  + " | ".join(f"memory {h}" for h in heads) + " |",
                  "|---|" + "---:|" * (2 * len(heads))]
        for name in models:
            cells = [ratio_cell(table.get((name, mode, n)), table.get((BASELINE, mode, n)), "steps_per_s", digits=1)
                     for n in args.lengths]
            cells += [ratio_cell(table.get((name, mode, n)), table.get((BASELINE, mode, n)), "peak_mem_mib")
                      for n in args.lengths]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines += ["", f"### {mode.capitalize()}: absolute (steps/s / peak memory growth MiB)", "",
                  "| Model | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(heads)]
        for name in models:
            cells = []
            for n in args.lengths:
                row = table.get((name, mode, n))
                if row is None:
                    cells.append("")
                elif row["status"] == "ok":
                    cells.append(f"{float(row['steps_per_s']):.3g} / {float(row['peak_mem_mib']):.0f}")
                else:
                    cells.append(STATUS_SHORT.get(row["status"], row["status"]))
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def target_checks(rows: list[dict]) -> list[tuple[str, str, bool | None]]:
    """Issue 6's targets (training step): (target, measured, met); met is None when not measured."""
    table = lookup(rows)

    def ratio(name, other, n, key):
        row, base = table.get((name, "train", n)), table.get((other, "train", n))
        if row and base and row["status"] == base["status"] == "ok":
            return float(row[key]) / float(base[key])
        return None

    checks = []
    speed, memory = ratio(LUNA_TARGET, BASELINE, 4096, "steps_per_s"), ratio(LUNA_TARGET, BASELINE, 4096,
                                                                                "peak_mem_mib")
    checks.append(("4K: Luna-16 ≥ 5.5× the steps/s of RoBERTa-SDPA",
                   "not measured" if speed is None else f"{speed:.2f}×", None if speed is None else speed >= 5.5))
    checks.append(("4K: Luna-16 ≤ 0.10× the peak memory of RoBERTa-SDPA",
                   "not measured" if memory is None else f"{memory:.3f}×", None if memory is None else memory <= 0.10))
    slowdown = ratio(BASELINE, LUNA_TARGET, 128, "steps_per_s")  # Luna's time / RoBERTa's time
    checks.append(("128: Luna-16 step time ≤ 1.1× RoBERTa-SDPA's", "not measured" if slowdown is None
                   else f"{slowdown:.2f}×", None if slowdown is None else slowdown <= 1.1))
    for n in sorted({int(row["seq_len"]) for row in rows if int(row["seq_len"]) >= 1024}):
        # Luna computes more than the floor (its attention and projections): compare FLOP rates, not step times.
        speed, work = ratio(LUNA_TARGET, FLOOR, n, "steps_per_s"), ratio(LUNA_TARGET, FLOOR, n, "gflop")
        rate = None if speed is None or work is None else speed * work
        checks.append((f"{label(n)}: Luna-16's FLOP rate relative to the attention-free floor's (a figure)",
                       "not measured" if rate is None else f"{rate:.2f} ({work:.2f}× the FLOPs)", None))
    return checks


def environment(args: BenchmarkArguments) -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else cpu
    return dict(device=device, threads=args.threads or torch.get_num_threads(), torch=torch.__version__,
                transformers=transformers.__version__, load_average=os.getloadavg(), python=platform.python_version())


def write_markdown(path: Path, rows: list[dict], args: BenchmarkArguments, before: dict, after: dict):
    shape = SIZES[args.size]
    checks = target_checks(rows) if "train" in args.modes else []
    lines = [
        f"# Benchmark results ({args.device}, size {args.size})", "",
        f"Command: `python {' '.join(sys.argv)}`", "",
        f"Shape: {shape['num_hidden_layers']} layers, hidden {shape['hidden_size']}, {shape['num_attention_heads']} "
        f"heads, FFN {shape['intermediate_size']}; batch {args.batch_size}; vocab {args.vocab_size}; {args.dtype}. "
        f"Device: {before['device']}, {before['threads']} threads; torch {before['torch']}, transformers "
        f"{before['transformers']}. Load average before {before['load_average'][0]:.2f}, after "
        f"{after['load_average'][0]:.2f}. Warm-up {args.warmup}, median of {args.min_repeats}-{args.repeats} steps; "
        f"limits {args.memory_limit_gb:g} GiB memory growth and {args.time_limit:g} s per configuration.", "",
        "Cells: steps/s ratio (higher is faster) and peak-memory ratio (lower is better) against the baseline at "
        "the same length; OOM = over the memory limit, time = over the time limit, — = skipped (it failed at a "
        "shorter length, or its step time there, scaled linearly, already exceeds the time limit), n/a = the "
        "baseline has no number there (see the absolute table).", "",
        markdown_tables(rows, args),
    ]
    if checks:
        lines += ["### Targets (issue 6, training step)", "", "| Target | Measured | Met |", "|---|---:|---|"]
        lines += [f"| {target} | {measured} | {'—' if met is None else ('yes' if met else 'no')} |"
                  for target, measured, met in checks]
        lines.append("")
    path.write_text("\n".join(lines))


def plot(rows: list[dict], args: BenchmarkArguments, output_dir: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    paths = []
    for mode in args.modes:
        figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(13, 5))
        colors = plt.get_cmap("tab20").colors  # 20 distinct colours: one per model
        for index, name in enumerate(MODELS):
            points = [(int(r["seq_len"]), 1 / float(r["steps_per_s"]), float(r["peak_mem_mib"])) for r in rows
                      if r["model"] == name and r["mode"] == mode and r["status"] == "ok"]
            if not points:
                continue
            lengths, seconds, memory = zip(*points, strict=True)
            style = dict(marker="o", linestyle="-" if name.startswith("luna") else "--", label=name,
                         color=colors[index], linewidth=2.5 if name in (BASELINE, FLOOR, LUNA_TARGET) else 1.2)
            time_axis.plot(lengths, seconds, **style)
            memory_axis.plot(lengths, [max(value, 1e-1) for value in memory], **style)
        for axis, ylabel in ((time_axis, "seconds per step"), (memory_axis, "peak memory growth (MiB)")):
            axis.set(xscale="log", yscale="log", xlabel="sequence length (tokens)", ylabel=ylabel)
            axis.set_xticks(args.lengths, [label(n) for n in args.lengths])
            axis.grid(True, which="both", alpha=0.3)
        memory_axis.legend(fontsize=8, ncol=2)
        figure.suptitle(f"{mode}, size {args.size}, batch {args.batch_size}, {args.device}")
        figure.tight_layout()
        path = output_dir / f"{args.prefix}{mode}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        paths.append(path)
    return paths


def available_memory() -> int:
    """Bytes the OS reports as available now (MemAvailable): the budget a new process can really use."""
    with open("/proc/meminfo") as meminfo:
        return next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))


STARTED = time.time()


def past_deadline(args: BenchmarkArguments) -> bool:
    return bool(args.deadline_seconds) and time.time() - STARTED > args.deadline_seconds


def longest_fitting(context, search: BenchmarkArguments, name: str) -> tuple[list[dict], int | None, int | None]:
    """Real training steps of `name` at batch 1, each in a fresh process: from --search_start double while a step
    fits (or halve while it does not), then bisect between the longest that fitted and the shortest that did not,
    to --search_resolution."""
    tries, fits, fails, n = [], None, None, search.search_start

    def attempt(n):
        tries.append(measure(context, search, name, "train", n))
        row = tries[-1]  # printed as it comes, so that a stopped search keeps what it found
        tqdm.write(f"{name} at {n:,} tokens: {row['status']}" + (
            f", {row['peak_mem_mib'] / 1024:.2f} GiB, {row['median_s']:.1f} s" if row["status"] == "ok" else
            f" ({row.get('error', '')})"))

    while 256 <= n <= search.search_stop and not (fits and fails) and not past_deadline(search):
        attempt(n)
        if tries[-1]["status"] == "error":  # a bug, not a length that does not fit
            raise RuntimeError(f"Max-length search, {name} at {n} tokens: {tries[-1]['error']}")
        if tries[-1]["status"] == "ok":
            fits, n = n, 2 * n
        else:
            fails, n = n, n // 2
    while fits and fails and fails - fits > search.search_resolution and not past_deadline(search):
        n = (fits + fails) // 2 // 256 * 256
        attempt(n)
        fits, fails = (n, fails) if tries[-1]["status"] == "ok" else (fits, n)
    return tries, fits, fails


def max_length_search(args: BenchmarkArguments, output_dir: Path) -> Path:
    """The longest training sequence of each --search_models model at base size and batch 1, found by running."""
    on_gpu = args.device == "cuda"
    if args.search_memory_gb:
        budget, budget_source = int(args.search_memory_gb * 2**30), "--search_memory_gb"
    elif on_gpu:
        budget, budget_source = torch.cuda.get_device_properties(0).total_memory, "the GPU"
    else:
        budget, budget_source = available_memory(), "MemAvailable when the search started"
    search = BenchmarkArguments(**{**asdict(args), "size": args.search_size, "batch_size": 1, "warmup": 0,
                                   "repeats": 1, "min_repeats": 1, "memory_limit_gb": budget / 2**30})
    shape = SIZES[args.search_size]
    context, sections = new_context(), []
    for name in tqdm(args.search_models, desc="max-length search"):
        tries, fits, fails = longest_fitting(context, search, name)
        rows = [f"| {row['seq_len']:,} | {STATUS_SHORT.get(row['status'], row['status'])} | "
                + (f"{row['peak_mem_mib'] / 1024:.2f} | {row['median_s']:.1f} |" if row["status"] == "ok" else
                   f"— | {'—' if row['status'] == 'oom' else row.get('error', '')} |") for row in tries]
        stopped = "the deadline stopped the search" if past_deadline(args) else "every length up to --search_stop fits"
        if not tries:
            verdict = "no step started before the deadline"
        elif fails is None:
            verdict = f"{stopped}: **≥ {fits:,} tokens** (longer not tried)"
        elif fits is None:
            verdict = f"even {fails:,} tokens do not fit"
        else:
            verdict = f"**{fits:,} tokens** fit; {fails:,} do not"
        sections.append(f"**{name}**: {verdict}.\n\n| tokens | result | peak memory growth (GiB) | step (s) |\n"
                        f"|---:|---|---:|---:|\n" + "\n".join(rows))
    path = output_dir / f"{args.prefix}max_length.md"
    path.write_text(
        f"### Longest training sequence: {args.search_size} size ({shape['num_hidden_layers']}/{shape['hidden_size']}/"
        f"{shape['num_attention_heads']}/{shape['intermediate_size']}), batch 1, {args.dtype}\n\n"
        f"Command: `python {' '.join(sys.argv)}`\n\nEach row is one real training step (forward, backward, AdamW "
        f"with its state allocated) in a fresh process, allowed {budget / 2**30:.1f} GiB ({budget_source}) and "
        f"--time_limit {args.time_limit:g} s; from {args.search_start:,} tokens the length doubles while a step fits "
        f"(halves while it does not), then bisects to {args.search_resolution:,} tokens.\n\n"
        + "\n\n".join(sections) + "\n"
    )
    return path


def sparse_mlm_comparison(args: BenchmarkArguments, output_dir: Path) -> Path:
    """`compare_mlm_heads` for every --mlm_presets model and length, each in a fresh process."""
    before, context = environment(args), new_context()
    lines = ["| Model | layers×width, FFN, l | vocab | tokens | dense tokens/s | sparse tokens/s | sparse speed-up | "
             "timed steps | peak memory growth dense / sparse (MiB) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in args.mlm_presets:
        size, projected_length, vocab_size = MLM_PRESETS[name]
        shape = SIZES[size]
        for n in tqdm(args.lengths, desc=name):
            row = measure(context, args, name, "mlm", n)
            if row["status"] == "ok":
                cells = [f"{row['dense_tokens_per_s']:,.0f}", f"{row['sparse_tokens_per_s']:,.0f}",
                         f"{row['dense_median_s'] / row['sparse_median_s']:.2f}×", f"{row['repeats']} each",
                         f"{row['dense_peak_mem_mib']:,.0f} / {row['sparse_peak_mem_mib']:,.0f}"]
            else:
                cells = [STATUS_SHORT.get(row["status"], row["status"])] * 4 + [row.get("error", "")]
            lines.append(f"| {name} | {shape['num_hidden_layers']}×{shape['hidden_size']}, FFN "
                         f"{shape['intermediate_size']}, l={projected_length} | {vocab_size:,} | {args.batch_size}×"
                         f"{label(n)} | " + " | ".join(cells) + " |")
    after = environment(args)
    path = output_dir / f"{args.prefix}sparse_mlm.md"
    path.write_text(
        f"### MLM head: sparse vs dense prediction, LunaForMaskedLM training step ({args.device})\n\n"
        f"Command: `python {' '.join(sys.argv)}`\n\nForward, backward and AdamW step on random tokens with 15% of "
        f"them labelled, {args.dtype}; the head on every token (dense, `sparse_prediction=False`) and on the "
        f"labelled ones (sparse) in turn on one model and batch, in a fresh process per row: warm-up steps "
        f"({max(1, args.warmup)} each, sparse first), then alternate steps, the median of each. Peak memory growth "
        f"over the built model, with gradients and AdamW state: sparse after its warm-up, dense over the whole run "
        f"(its n × vocab logits are the larger). Device: {before['device']}, {before['threads']} threads; torch "
        f"{before['torch']}, transformers {before['transformers']}; load average before "
        f"{before['load_average'][0]:.2f}, after {after['load_average'][0]:.2f}.\n\n" + "\n".join(lines) + "\n"
    )
    return path


def profile_model(args: BenchmarkArguments, output_dir: Path) -> Path:
    from torch.profiler import ProfilerActivity, profile

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = build_model(args.profile, args.size, args.profile_length, args.vocab_size).to(device)
    step = make_step(model, "train", make_batch(asdict(args), args.profile_length, device), args.dtype, device)
    for _ in range(max(1, args.warmup)):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as profiler:
        for _ in range(args.min_repeats):
            step()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    averages = profiler.key_averages()
    path = output_dir / f"{args.prefix}profile_{args.profile}_{args.profile_length}.txt"
    path.write_text(
        f"{args.profile}, size {args.size}, length {args.profile_length}, batch {args.batch_size}, "
        f"{args.min_repeats} training steps\n\n" + averages.table(sort_by=sort, row_limit=30) + "\n\nBy input shape:\n"
        + profiler.key_averages(group_by_input_shape=True).table(sort_by=sort, row_limit=40, max_shapes_column_width=90)
    )
    return path


def main():
    (args,) = HfArgumentParser(BenchmarkArguments).parse_args_into_dataclasses()
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if not args.prefix and args.device == "cuda":
        args.prefix = "gpu_"
    if args.profile:
        print(f"Wrote {profile_model(args, output_dir)}")
        return
    if args.max_length_search or args.sparse_mlm:
        path = (max_length_search if args.max_length_search else sparse_mlm_comparison)(args, output_dir)
        print(path.read_text())
        return
    before = environment(args)
    csv_path = output_dir / f"{args.prefix}results.csv"
    rows = run_benchmark(args, csv_path)
    after = environment(args)
    markdown_path = output_dir / f"{args.prefix}results.md"
    write_markdown(markdown_path, rows, args, before, after)
    (output_dir / f"{args.prefix}environment.json").write_text(json.dumps(dict(before=before, after=after,
                                                                               args=asdict(args)), indent=1))
    plots = plot(rows, args, output_dir)
    print(markdown_path.read_text())
    print(f"Wrote {csv_path}, {markdown_path}" + "".join(f", {path}" for path in plots))


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Per-token generation latency and training speed of the causal Luna (`LunaForCausalLM`, paper §3.3) against a
GPT-2 of the same width, depth and FFN size with its KV cache (SDPA attention):

    python scripts/benchmark_generation.py --threads 1 --output benchmarks/results/generation.md

Decoding: for each context length, the model reads a random context of that many tokens (the prefill, timed once),
then generates tokens greedily, one forward with the cache per token; the per-token latency is the median of the
timed steps. The contexts take turns in one process per model, `--rounds` times a block of `--warmup_tokens`
untimed and `--new_tokens` timed steps, so that a busy machine slows them alike. Luna's cache holds per layer and
head two running sums, the pack queries and a token count, whatever the context; GPT-2's holds the keys and values
of every token.
Training: forward, backward and AdamW step of the language-modelling loss, median of `--train_steps` steps after one
untimed step, one process per model and length. See docs/causal.md.
"""

import multiprocessing
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel, HfArgumentParser

from luna_hf import LunaConfig, LunaForCausalLM
from luna_hf.measurement import cache_mib
from luna_hf.transformers_compat import CACHE_OUTPUT_NAME

MODELS = ("luna", "gpt2")
TITLES = {"luna": "Luna", "gpt2": "GPT-2 (KV cache, SDPA)"}


@dataclass
class GenerationBenchmarkArguments:
    contexts: list[int] = field(default_factory=lambda: [1024, 4096, 16384, 32768],
                                metadata={"help": "Context lengths (tokens read before generating)."})
    rounds: int = field(default=4, metadata={"help": "Rounds over the contexts (each context one block a round)."})
    new_tokens: int = field(default=16, metadata={"help": "Timed generation steps per context and round."})
    warmup_tokens: int = field(default=4, metadata={"help": "Untimed generation steps before them, each round."})
    train_lengths: list[int] = field(default_factory=lambda: [512, 1024, 2048, 4096],
                                     metadata={"help": "Sequence lengths of the timed training steps."})
    train_batch_size: int = field(default=1)
    train_steps: int = field(default=5, metadata={"help": "Timed training steps per length (median reported)."})
    hidden_size: int = field(default=256)
    num_hidden_layers: int = field(default=4)
    num_attention_heads: int = field(default=4)
    intermediate_size: int = field(default=1024)
    vocab_size: int = field(default=512, metadata={"help": "Byte-level vocabulary."})
    projected_length: int = field(default=16, metadata={"help": "Luna's l."})
    causal_chunk_size: int = field(default=64, metadata={"help": "Luna's chunk length c for training and prefill."})
    attention_type: Literal["nested", "learned_kernel"] = field(
        default="nested", metadata={"help": "The Luna model's attention: nested (Ma et al.) or learned_kernel."}
    )
    threads: int = field(default=1, metadata={"help": "torch threads per configuration."})
    fresh_process: bool = field(default=True, metadata={"help": "Run each model (and training length) in its own "
                                                           "process."})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda (timings then wait for the GPU: synchronize)."})
    output: str = field(default="benchmarks/results/generation.md")


def build_model(args: GenerationBenchmarkArguments, name: str, max_length: int):
    """The two models at the same size, positions for `max_length` tokens, no dropout."""
    torch.manual_seed(0)
    if name == "luna":
        config = LunaConfig(
            is_decoder=True, vocab_size=args.vocab_size, hidden_size=args.hidden_size,
            num_hidden_layers=args.num_hidden_layers, num_attention_heads=args.num_attention_heads,
            intermediate_size=args.intermediate_size, projected_length=args.projected_length,
            causal_chunk_size=args.causal_chunk_size, max_position_embeddings=max_length + 2,
            attention_type=args.attention_type,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )  # fmt: skip
        return LunaForCausalLM(config)
    config = GPT2Config(
        vocab_size=args.vocab_size, n_embd=args.hidden_size, n_layer=args.num_hidden_layers,
        n_head=args.num_attention_heads, n_inner=args.intermediate_size, n_positions=max_length,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=2,
        attn_implementation="sdpa",
    )  # fmt: skip
    return GPT2LMHeadModel(config)


def measure_decoding(args: GenerationBenchmarkArguments, name: str) -> list[dict]:
    """Prefill every context (one cache each), then generate from them in turn, a block of tokens per context and
    round, so that the machine's load weighs on every context alike (the untimed first steps of a block absorb what
    the other contexts' caches did to the CPU caches)."""
    torch.set_num_threads(args.threads)
    model = build_model(args, name, max_generated_length(args)).to(args.device).eval()
    clock = Clock(args.device)
    caches, next_tokens, prefill_seconds, step_seconds = {}, {}, {}, {context: [] for context in args.contexts}
    with torch.inference_mode():
        for context in args.contexts:
            ids = torch.randint(3, args.vocab_size, (1, context), generator=torch.Generator().manual_seed(context))
            start = clock()
            outputs = model(ids.to(args.device), use_cache=True, logits_to_keep=1)
            prefill_seconds[context] = clock() - start
            caches[context] = getattr(outputs, CACHE_OUTPUT_NAME)
            next_tokens[context] = outputs.logits[:, -1:].argmax(-1)
        for _ in range(args.rounds):
            for context in args.contexts:
                for step in range(args.warmup_tokens + args.new_tokens):
                    start = clock()
                    outputs = model(next_tokens[context], **{CACHE_OUTPUT_NAME: caches[context]}, use_cache=True)
                    next_tokens[context] = outputs.logits[:, -1:].argmax(-1)
                    if step >= args.warmup_tokens:
                        step_seconds[context].append(clock() - start)
    rows = []
    for context in args.contexts:
        timed = sorted(step_seconds[context])
        rows.append(dict(model=name, context=context, prefill_s=prefill_seconds[context],
                         ms_per_token=1e3 * statistics.median(timed), p90_ms=1e3 * timed[int(0.9 * (len(timed) - 1))],
                         cache_mib=cache_mib(caches[context])))  # fmt: skip
    return rows


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if torch.device(device).type == "cuda" else "CPU"


class Clock:
    """`time.perf_counter()`, after waiting for the GPU's queued work when timing on CUDA."""

    def __init__(self, device: str):
        self.cuda = torch.device(device).type == "cuda"

    def __call__(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


def max_generated_length(args: GenerationBenchmarkArguments) -> int:
    return max(args.contexts) + args.rounds * (args.warmup_tokens + args.new_tokens)


def measure_training(args: GenerationBenchmarkArguments, name: str, length: int) -> dict:
    torch.set_num_threads(args.threads)
    model = build_model(args, name, length).to(args.device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(3, args.vocab_size, (args.train_batch_size, length), generator=torch.Generator().manual_seed(0))
    ids, clock, step_seconds = ids.to(args.device), Clock(args.device), []
    for _ in range(1 + args.train_steps):
        start = clock()
        model(ids, labels=ids, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_seconds.append(clock() - start)
    median = statistics.median(step_seconds[1:])
    return dict(model=name, length=length, step_s=median, tokens_per_s=args.train_batch_size * length / median)


def run(function, *arguments, fresh_process: bool) -> dict:
    if not fresh_process:
        return function(*arguments)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, arguments)


def report(args, command, decoding, training, load_before) -> str:
    luna = {row["context"]: row for row in decoding if row["model"] == "luna"}
    gpt2 = {row["context"]: row for row in decoding if row["model"] == "gpt2"}
    first, last = min(args.contexts), max(args.contexts)
    ratio = luna[last]["ms_per_token"] / luna[first]["ms_per_token"]
    max_length = max_generated_length(args)
    parameters = {name: sum(p.numel() for p in build_model(args, name, max_length).parameters()) for name in MODELS}
    lines = [
        f"# Causal Luna vs GPT-2: per-token generation latency and training speed ({device_name(args.device)})",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores shared with other work "
        f"(load average {load_before:.2f} at the start, {os.getloadavg()[0]:.2f} at the end), {args.threads} torch "
        f"thread(s); torch {torch.__version__}, transformers {transformers.__version__}, Python "
        f"{platform.python_version()}. One process per model (decoding) and per model and length (training): "
        f"{args.fresh_process}.",
        "",
        f"Models: {args.num_hidden_layers} layers, width {args.hidden_size}, {args.num_attention_heads} heads, FFN "
        f"{args.intermediate_size}, vocabulary {args.vocab_size}, learned positions for {max_length} tokens, no "
        f"dropout, float32. Luna ({parameters['luna'] / 1e6:.2f}M parameters, attention_type "
        f"{args.attention_type}): l = {args.projected_length}, softplus (β = ln 2), tied K/V (nested attention only), "
        f"chunk c = {args.causal_chunk_size}. GPT-2 ({parameters['gpt2'] / 1e6:.2f}M "
        "parameters): `GPT2LMHeadModel`, SDPA attention, `DynamicCache`.",
        "",
        f"## Per-token generation latency: median of {args.rounds} x {args.new_tokens} greedy steps per context",
        "",
        "| context | Luna ms/token | GPT-2 ms/token | Luna p90 | GPT-2 p90 | Luna cache MiB | GPT-2 cache MiB "
        "| Luna prefill s | GPT-2 prefill s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for context in args.contexts:
        a, b = luna[context], gpt2[context]
        lines.append(f"| {context} | {a['ms_per_token']:.2f} | {b['ms_per_token']:.2f} | {a['p90_ms']:.2f} | "
                     f"{b['p90_ms']:.2f} | {a['cache_mib']:.3f} | {b['cache_mib']:.1f} | {a['prefill_s']:.2f} | "
                     f"{b['prefill_s']:.2f} |")  # fmt: skip
    verdict = "met" if ratio <= 1.1 else "not met"
    lines += [
        "",
        f"Target: Luna's per-token latency at {last} tokens within 1.1x of that at {first}: "
        f"{luna[last]['ms_per_token']:.2f} / {luna[first]['ms_per_token']:.2f} = {ratio:.3f}x, **{verdict}**. "
        f"GPT-2: {gpt2[last]['ms_per_token'] / gpt2[first]['ms_per_token']:.2f}x.",
        "",
        f"## Training step (forward, backward, AdamW), batch {args.train_batch_size}, median of {args.train_steps}",
        "",
        "| length | Luna s/step | GPT-2 SDPA s/step | Luna tokens/s | GPT-2 tokens/s | Luna / GPT-2 speed |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for length in args.train_lengths:
        a, b = (next(r for r in training if r["model"] == m and r["length"] == length) for m in MODELS)
        lines.append(f"| {length} | {a['step_s']:.3f} | {b['step_s']:.3f} | {a['tokens_per_s']:.0f} | "
                     f"{b['tokens_per_s']:.0f} | {a['tokens_per_s'] / b['tokens_per_s']:.2f}x |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main():
    (args,) = HfArgumentParser(GenerationBenchmarkArguments).parse_args_into_dataclasses()
    command = "python scripts/benchmark_generation.py " + " ".join(sys.argv[1:])
    load_before = os.getloadavg()[0]
    print(asdict(args), flush=True)
    decoding, training = [], []
    for name in MODELS:
        decoding += run(measure_decoding, args, name, fresh_process=args.fresh_process)
        print(decoding[-len(args.contexts) :], flush=True)
    for length in args.train_lengths:
        for name in MODELS:
            training.append(run(measure_training, args, name, length, fresh_process=args.fresh_process))
            print(training[-1], flush=True)
    text = report(args, command, decoding, training, load_before)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(text)
    print(text)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Per-token decoding latency of the encoder-decoder Luna (`LunaForConditionalGeneration`, paper Table 4's model)
against a Transformer of the same size with its KV cache (transformers' Marian, SDPA attention), as the source grows:

    python scripts/benchmark_seq2seq.py --threads 1 --output benchmarks/results/seq2seq_decoding.md

For each source length the model encodes a random source (timed), takes the first decoder step (which fills the
cache: for Luna each layer's packed source, for the Transformer the cross-attention keys and values of every source
token), then decodes greedily with the cache, one forward per token, exactly as `generate()` does; the per-token
latency is the median of the timed steps. The sources take turns, `--rounds` times a block of `--warmup_tokens`
untimed and `--new_tokens` timed steps, so that a busy machine slows them alike; each model runs in its own process.
Luna's decoder reads neither the source nor the target's past after the first step (docs/seq2seq.md), so its
per-token cost should not depend on either length; the Transformer's cross-attention reads every source token.
"""

import multiprocessing
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
import transformers
from transformers import HfArgumentParser, MarianConfig, MarianMTModel

from luna_hf import LunaForConditionalGeneration, LunaSeq2SeqConfig
from luna_hf.measurement import cache_mib
from luna_hf.transformers_compat import CACHE_OUTPUT_NAME


@dataclass
class Seq2SeqBenchmarkArguments:
    sources: list[int] = field(default_factory=lambda: [128, 1024, 4096, 16384],
                               metadata={"help": "Source lengths (tokens the encoder reads)."})
    models: list[str] = field(default_factory=lambda: ["luna-16", "luna-32", "transformer"],
                              metadata={"help": "luna-L (Luna with projected length L) and/or transformer."})
    rounds: int = field(default=2, metadata={"help": "Rounds over the sources (each source one block a round)."})
    new_tokens: int = field(default=32, metadata={"help": "Timed decoding steps per source and round."})
    warmup_tokens: int = field(default=4, metadata={"help": "Untimed decoding steps before them, each round."})
    hidden_size: int = 512
    layers: int = field(default=6, metadata={"help": "Encoder layers, and as many decoder layers."})
    num_attention_heads: int = 8
    intermediate_size: int = 2048
    vocab_size: int = 8000
    threads: int = field(default=1, metadata={"help": "torch threads per model."})
    device: str = field(default="cpu", metadata={"help": "cpu, or cuda for a GPU (timings synchronise the device)."})
    output: str = field(default="benchmarks/results/seq2seq_decoding.md")

    def __post_init__(self):
        for name in self.models:
            if name != "transformer" and not (name.startswith("luna-") and name[5:].isdigit()):
                raise ValueError(f"--models: {name!r} is neither 'transformer' nor 'luna-L' (e.g. luna-16).")
        if min(self.sources) < 1 or self.new_tokens < 1 or self.rounds < 1:
            raise ValueError("--sources, --new_tokens and --rounds must be positive.")


def build_model(args: Seq2SeqBenchmarkArguments, name: str):
    """Both models at the same width, depth, heads and FFN, positions for the longest source, no dropout, tied
    embeddings (Transformer-base and the authors' luna_base_tied shape by default)."""
    torch.manual_seed(0)
    positions = max(args.sources) + args.rounds * (args.warmup_tokens + args.new_tokens) + 2
    if name == "transformer":
        config = MarianConfig(
            vocab_size=args.vocab_size, d_model=args.hidden_size, encoder_layers=args.layers,
            decoder_layers=args.layers, encoder_attention_heads=args.num_attention_heads,
            decoder_attention_heads=args.num_attention_heads, encoder_ffn_dim=args.intermediate_size,
            decoder_ffn_dim=args.intermediate_size, max_position_embeddings=positions, dropout=0.0,
            pad_token_id=1, eos_token_id=2, decoder_start_token_id=2, attn_implementation="sdpa",
        )  # fmt: skip
        return MarianMTModel(config)
    config = LunaSeq2SeqConfig(
        vocab_size=args.vocab_size, hidden_size=args.hidden_size, encoder_layers=args.layers,
        decoder_layers=args.layers, num_attention_heads=args.num_attention_heads,
        intermediate_size=args.intermediate_size, projected_length=int(name[5:]),
        max_position_embeddings=positions, hidden_dropout_prob=0.0,
    )  # fmt: skip
    return LunaForConditionalGeneration(config)


def clock(device: str) -> float:
    """Wall time after the device has finished the work queued so far (CUDA kernels run asynchronously)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    return time.perf_counter()


def measure_decoding(args: Seq2SeqBenchmarkArguments, name: str) -> list[dict]:
    torch.set_num_threads(args.threads)
    model = build_model(args, name).eval().to(args.device)
    start_token = torch.full((1, 1), model.config.decoder_start_token_id, device=args.device)
    state, encode_seconds, step_seconds = {}, {}, {source: [] for source in args.sources}
    with torch.inference_mode():
        for source in args.sources:
            ids = torch.randint(3, args.vocab_size, (1, source), generator=torch.Generator().manual_seed(source))
            start = clock(args.device)
            encoder_outputs = model.get_encoder()(input_ids=ids.to(args.device))
            encode_seconds[source] = clock(args.device) - start
            outputs = model(encoder_outputs=encoder_outputs, decoder_input_ids=start_token, use_cache=True)
            state[source] = (encoder_outputs, getattr(outputs, CACHE_OUTPUT_NAME), outputs.logits[:, -1:].argmax(-1))
        for _ in range(args.rounds):
            for source in args.sources:
                encoder_outputs, cache, next_token = state[source]
                for step in range(args.warmup_tokens + args.new_tokens):
                    start = clock(args.device)
                    outputs = model(encoder_outputs=encoder_outputs, decoder_input_ids=next_token,
                                    **{CACHE_OUTPUT_NAME: cache}, use_cache=True)  # fmt: skip
                    next_token = outputs.logits[:, -1:].argmax(-1)
                    if step >= args.warmup_tokens:
                        step_seconds[source].append(clock(args.device) - start)
                state[source] = (encoder_outputs, cache, next_token)
    parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)  # not Marian's fixed sinusoids
    rows = []
    for source in args.sources:
        timed = sorted(step_seconds[source])
        cache = state[source][1]
        cache_size = cache_mib(cache.self_attention_cache) + cache_mib(cache.cross_attention_cache)
        rows.append(dict(model=name, source=source, encode_s=encode_seconds[source], parameters=parameters,
                         ms_per_token=1e3 * statistics.median(timed), p90_ms=1e3 * timed[int(0.9 * (len(timed) - 1))],
                         cache_mib=cache_size))  # fmt: skip
    return rows


def machine(args: Seq2SeqBenchmarkArguments) -> str:
    cpu = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    if args.device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(args.device)} ({cpu})"
    load = f"load average {os.getloadavg()[0]:.2f} at the end"
    return f"{cpu} shared with other work ({load}), {args.threads} torch thread(s) per model"


def report(args: Seq2SeqBenchmarkArguments, command: str, rows: list[dict]) -> str:
    first, last = min(args.sources), max(args.sources)
    by_model = {name: {row["source"]: row for row in rows if row["model"] == name} for name in args.models}
    lines = [
        "# Encoder-decoder Luna vs a Transformer with its KV cache: per-token decoding latency by source length "
        f"({'GPU' if args.device.startswith('cuda') else 'CPU'})",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {machine(args)}, one process per model; torch {torch.__version__}, transformers "
        f"{transformers.__version__}.",
        "",
        f"Models: {args.layers} + {args.layers} layers, width {args.hidden_size}, {args.num_attention_heads} heads, "
        f"FFN {args.intermediate_size}, vocabulary {args.vocab_size}, tied embeddings, no dropout, float32, batch 1, "
        "greedy. Luna-l: `LunaForConditionalGeneration` (tied K/V, the authors' luna_base_tied); transformer: "
        "`MarianMTModel` (SDPA, `EncoderDecoderCache`). Trainable parameters: "
        + ", ".join(f"{name} {by_model[name][first]['parameters'] / 1e6:.1f}M" for name in args.models) + ".",
        "",
        f"Per-token latency: median (p90) of {args.rounds} x {args.new_tokens} cached steps per source, in ms; cache "
        "size after decoding, in MiB; encoder time for the source, in s.",
        "",
        "| source | "
        + " | ".join(f"{name} ms/token (p90) | {name} cache MiB | {name} encode s" for name in args.models)
        + " |",
        "|---:|" + "---:|---:|---:|" * len(args.models),
    ]
    for source in args.sources:
        cells = [f"{r['ms_per_token']:.2f} ({r['p90_ms']:.2f}) | {r['cache_mib']:.2f} | {r['encode_s']:.2f}"
                 for r in (by_model[name][source] for name in args.models)]  # fmt: skip
        lines.append(f"| {source} | " + " | ".join(cells) + " |")
    lines.append("")
    for name in args.models:
        ratio = by_model[name][last]["ms_per_token"] / by_model[name][first]["ms_per_token"]
        verdict = "met" if ratio <= 1.1 else "not met"
        target = "" if name == "transformer" else f" (target for Luna: within 1.1x, **{verdict}**)"
        lines.append(f"- {name}: per-token latency at a {last}-token source / at {first}: {ratio:.2f}x{target}.")
    return "\n".join(lines) + "\n"


def main():
    (args,) = HfArgumentParser(Seq2SeqBenchmarkArguments).parse_args_into_dataclasses()
    command = "python scripts/benchmark_seq2seq.py " + " ".join(sys.argv[1:])
    print(asdict(args), flush=True)
    rows = []
    for name in args.models:  # a fresh process per model: one model's memory does not slow the next
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            rows += pool.apply(measure_decoding, (args, name))
        for row in rows[-len(args.sources) :]:
            print(f"{row['model']} source {row['source']}: {row['ms_per_token']:.2f} ms/token", flush=True)
    text = report(args, command, rows)
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output + ".tmp", "w") as handle:
        handle.write(text)
    os.replace(args.output + ".tmp", args.output)
    print(text)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Inference latency of a Luna sequence classifier in onnxruntime against PyTorch eager, side by side in one run.

    python scripts/benchmark_onnx.py --lengths 128 4096 --output benchmarks/results/onnx.md

One model (the benchmark's `--size`, random weights) is exported once with dynamic shapes
(`scripts/export_onnx.py`'s exporter); for each length both runtimes take turns on the same inputs, `--repeats`
times after one warm-up each, and the medians are compared. Batch size 1, fp32, CPU, the same thread count for both.
"""

import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser

from luna_hf import LunaConfig, LunaForSequenceClassification
from luna_hf.measurement import SIZES
from luna_hf.onnx_export import export_to_onnx


@dataclass
class OnnxBenchmarkArguments:
    lengths: list[int] = field(default_factory=lambda: [128, 4096])
    size: str = field(default="small", metadata={"help": f"One of {list(SIZES)}."})
    projected_length: int = 16
    repeats: int = 10
    threads: int | None = field(default=None, metadata={"help": "Threads for both runtimes (default: torch's)."})
    output: str | None = field(default=None, metadata={"help": "Also write the markdown table here."})


def main(argv: list[str] | None = None) -> str:
    import onnxruntime

    (args,) = HfArgumentParser(OnnxBenchmarkArguments).parse_args_into_dataclasses(args=argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = LunaConfig(**SIZES[args.size], vocab_size=1000, projected_length=args.projected_length, num_labels=2,
                        max_position_embeddings=max(args.lengths) + 2)
    model = LunaForSequenceClassification(config).eval()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    rows = ["| tokens | PyTorch eager (ms) | onnxruntime (ms) | speed-up | largest difference |",
            "|---:|---:|---:|---:|---:|"]
    with tempfile.TemporaryDirectory() as folder:
        length = min(64, config.max_sequence_length)
        example = {"input_ids": torch.randint(3, 1000, (2, length)),
                   "attention_mask": torch.ones(2, length, dtype=torch.long)}
        export_to_onnx(model, example, ["logits"], Path(folder) / "model.onnx")
        session = onnxruntime.InferenceSession(str(Path(folder) / "model.onnx"), options,
                                               providers=["CPUExecutionProvider"])
        for length in args.lengths:
            inputs = {"input_ids": torch.randint(3, 1000, (1, length)),
                      "attention_mask": torch.ones(1, length, dtype=torch.long)}
            feed = {name: tensor.numpy() for name, tensor in inputs.items()}
            timings = {"torch": [], "onnx": []}
            for repeat in range(args.repeats + 1):  # the first of each is a warm-up
                start = time.perf_counter()
                with torch.inference_mode():
                    expected = model(**inputs).logits
                torch_seconds = time.perf_counter() - start
                start = time.perf_counter()
                (actual,) = session.run(["logits"], feed)
                onnx_seconds = time.perf_counter() - start
                if repeat:
                    timings["torch"].append(torch_seconds)
                    timings["onnx"].append(onnx_seconds)
            torch_ms, onnx_ms = (1000 * statistics.median(timings[key]) for key in ("torch", "onnx"))
            difference = float(abs(actual - expected.numpy()).max())
            rows.append(f"| {length} | {torch_ms:.1f} | {onnx_ms:.1f} | {torch_ms / onnx_ms:.2f}x | {difference:.1e} |")
    table = "\n".join(rows)
    header = (f"Luna-{args.projected_length} sequence classifier, size {args.size} ({SIZES[args.size]}), batch 1, "
              f"fp32, {torch.get_num_threads()} threads, median of {args.repeats}; torch {torch.__version__}, "
              f"onnxruntime {onnxruntime.__version__}\n\n")
    print(header + table)
    if args.output:
        Path(args.output).write_text(header + table + "\n")
    return table


if __name__ == "__main__":
    main()

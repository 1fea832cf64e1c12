#!/usr/bin/env python
"""The GPU measurement in one command, for a session lent a GPU machine as it comes (its image: torch 2.11+cu130,
transformers 5.17, huggingface_hub 1.33, no datasets, no evaluate, no internet). It installs nothing and reads luna_hf
from `src/`:

    python -u scripts/gpu_run.py --results_dir $OUT              # about 8 minutes on one H100
    python scripts/gpu_run.py --dry_run --results_dir /tmp/gpu   # the same phases at tiny sizes, on the CPU

The phases run in order, each in its own process, given what is left of `--budget_seconds` (less a reserve for the
phases after it) and stopped when that runs out, so the whole run ends within the budget with the rows that fitted.
Each writes its file into `--results_dir` (flat; 8 files at most) the moment it has it:

a. `gpu_checks.md`: correctness on CUDA: every head, nested and learned kernel, the causal LM and the translation
   model in float32 against the CPU (<= 1e-4); the same under bf16 autocast (finite, cosine >= 0.99 to float32); a
   training step through the fused SDPA kernels (flash / memory-efficient only) against the CPU's loss and gradient
   norm; `generate()` on CUDA: the CPU's tokens, its cache on the device, and decoding steps that never synchronise
   with the host (`torch.cuda.set_sync_debug_mode("error")`).
b. `gpu_results.{csv,md}`, `gpu_environment.json`, `gpu_train.png`: the training step at base size, bf16 autocast,
   1K-32K tokens: Luna-16, Luna-128, the learned kernel, RoBERTa with SDPA (flash: no attention dropout; and with
   dropout 0.1, the ratios' baseline) and ModernBERT; steps/s and peak memory (`scripts/benchmark.py`; its CSV grows
   row by row).
c. `gpu_generation.md`: causal decoding per token at 1K and 32K contexts against GPT-2 with its KV cache, base size
   (`scripts/benchmark_generation.py`).
d. `gpu_max_length.md`: the longest base-size training sequence with gradient checkpointing, found by running
   (`scripts/benchmark.py --max_length_search`; each try is also in the log).

Everything printed also goes to `gpu_run.log`. docs/gpu.md: how to run it and what came back.
"""

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "src"
TRAIN_MODELS = ["luna-16", "luna-128", "learned-kernel", "roberta-sdpa-nodrop", "roberta-sdpa", "modernbert"]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results_dir", required=True, help="Where the files go (the device tool's $OUT).")
    parser.add_argument("--budget_seconds", type=float, default=450.0, help="The whole run stops within this.")
    parser.add_argument("--dry_run", action="store_true", help="Tiny sizes on the CPU: checks that every phase runs.")
    parser.add_argument("--phase", choices=["checks"], help=argparse.SUPPRESS)  # phase a, in its own process
    return parser.parse_args()


def phases(dry_run: bool, results_dir: Path) -> list[tuple[str, list[str], float]]:
    """(name, command, share of the budget) in order; on the GPU at base size, in the dry run tiny on the CPU."""
    python, out = [sys.executable, "-u"], str(results_dir)
    if dry_run:
        table = ["--device", "cpu", "--size", "tiny", "--dtype", "float32", "--lengths", "64", "128",
                 "--memory_limit_gb", "4"]  # fmt: skip
        generation = ["--device", "cpu", "--contexts", "64", "128", "--rounds", "1", "--new_tokens", "2",
                      "--warmup_tokens", "1", "--train_lengths", "64", "--train_steps", "1", "--hidden_size",
                      "32", "--num_hidden_layers", "2", "--num_attention_heads", "2", "--intermediate_size",
                      "64"]  # fmt: skip
        search = ["--device", "cpu", "--search_size", "tiny", "--search_start", "256", "--search_stop", "512",
                  "--search_resolution", "256"]  # fmt: skip
    else:
        table = ["--device", "cuda", "--size", "base", "--dtype", "bfloat16", "--lengths", "1024", "4096", "16384",
                 "32768", "--memory_limit_gb", "70"]  # fmt: skip
        generation = ["--device", "cuda", "--contexts", "1024", "32768", "--rounds", "2", "--new_tokens", "16",
                      "--train_lengths", "4096", "--train_steps", "3", "--hidden_size", "768", "--num_hidden_layers",
                      "12", "--num_attention_heads", "12", "--intermediate_size", "3072"]  # fmt: skip
        search = ["--device", "cuda", "--dtype", "bfloat16", "--search_size", "base", "--search_start", "65536",
                  "--search_stop", "1048576", "--search_resolution", "65536"]  # fmt: skip
    benchmark = [*python, str(ROOT / "scripts" / "benchmark.py"), "--output_dir", out, "--prefix", "gpu_"]
    return [
        ("a. correctness on the device", [*python, __file__, "--phase", "checks", "--results_dir", out]
         + (["--dry_run"] if dry_run else []), 0.12),
        ("b. training-step table", [*benchmark, *table, "--modes", "train", "--models", *TRAIN_MODELS, "--warmup",
                                    "1", "--repeats", "5", "--min_repeats", "2", "--measure_seconds", "2",
                                    "--time_limit", "45"], 0.5),
        ("c. causal decoding", [*python, str(ROOT / "scripts" / "benchmark_generation.py"), *generation,
                                "--output", str(results_dir / "gpu_generation.md")], 0.35),
        ("d. longest training sequence", [*benchmark, "--max_length_search", *search, "--search_models",
                                          "luna-16-checkpointing", "--time_limit", "60"], 1.0),
    ]  # fmt: skip


class Log:
    """Prints, unbuffered, and appends the same line to gpu_run.log."""

    def __init__(self, path: Path):
        self.path = path

    def __call__(self, text: str) -> None:
        print(text, flush=True)
        with open(self.path, "a") as handle:
            handle.write(text + "\n")


def run_phase(command: list[str], seconds: float, log: Log) -> str:
    """Run one phase, its output streamed into the log, killed when its time is up. Returns how it ended."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SOURCE), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    # Its own process group: the benchmarks measure in child processes, which must stop with it (a 32K step left
    # running would hold the GPU while the next phase measures).
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)  # fmt: skip
    reader = threading.Thread(target=lambda: [log(line.rstrip()) for line in process.stdout], daemon=True)
    reader.start()
    try:
        process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        for signal_number, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal_number)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=grace)
        reader.join(timeout=5)
        return f"stopped after {seconds:.0f} s (its budget): its log lines and CSV rows so far are kept"
    reader.join(timeout=5)
    return "done" if process.returncode == 0 else f"failed (exit {process.returncode})"


# ---------------------------------------------------------------------------------------------------------------
# Phase a: correctness on the device


def tiny_models():
    """(name, model, inputs) of every kind, float32, no dropout, padded inputs."""
    import torch

    import luna_hf

    shape = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                 projected_length=8, max_position_embeddings=130, hidden_dropout_prob=0.0,
                 attention_probs_dropout_prob=0.0)  # fmt: skip
    ids = torch.randint(3, 96, (3, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 25:], mask[2, 10:] = 0, 0
    heads = [("LunaForMaskedLM", {}), ("LunaForSequenceClassification", {"classifier_pooling": "packed_attention"}),
             ("LunaForTokenClassification", {}), ("LunaForMultipleChoice", {}), ("LunaForQuestionAnswering", {}),
             ("LunaForCausalLM", {"is_decoder": True})]  # fmt: skip
    for attention in ("nested", "learned_kernel"):
        for head, overrides in heads:
            if attention == "learned_kernel" and overrides.get("classifier_pooling"):
                overrides = {"classifier_pooling": "mean"}
            torch.manual_seed(0)
            model = getattr(luna_hf, head)(luna_hf.LunaConfig(**shape, **overrides, attention_type=attention))
            inputs = dict(input_ids=ids, attention_mask=mask)
            if head == "LunaForMultipleChoice":
                inputs = {key: value[:, None].expand(-1, 2, -1) for key, value in inputs.items()}
            yield f"{head} ({attention})", model.eval(), inputs
    torch.manual_seed(0)
    config = luna_hf.LunaSeq2SeqConfig(vocab_size=96, hidden_size=64, encoder_layers=2, decoder_layers=2,
                                       num_attention_heads=4, intermediate_size=128, projected_length=8,
                                       hidden_dropout_prob=0.0)  # fmt: skip
    inputs = dict(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, :12])
    yield "LunaForConditionalGeneration", luna_hf.LunaForConditionalGeneration(config).eval(), inputs


def first_output(outputs):
    return outputs.logits if hasattr(outputs, "logits") else outputs.start_logits


def check_heads(device: str) -> list[str]:
    """Every head in float32 on the device against the CPU, and under bf16 autocast against float32."""
    import torch

    rows = ["| model | float32, largest difference to the CPU | bf16 autocast: finite, cosine to float32 |",
            "|---|---:|---:|"]  # fmt: skip
    for name, model, inputs in tiny_models():
        with torch.no_grad():
            expected = first_output(model(**inputs)).float()
            model.to(device)
            on_device = {key: value.to(device) for key, value in inputs.items()}
            exact = first_output(model(**on_device)).float().cpu()
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
                half = first_output(model(**on_device)).float().cpu()
        difference = float((exact - expected).abs().max())
        cosine = float(torch.nn.functional.cosine_similarity(half.flatten(), exact.flatten(), dim=0))
        finite = bool(torch.isfinite(half).all())
        verdict = "ok" if difference <= 1e-4 and finite and cosine >= 0.99 else "**FAILED**"
        rows.append(f"| {name} | {difference:.1e} | {finite}, {cosine:.4f} ({verdict}) |")
    return rows


def check_fused_training_step(device: str) -> list[str]:
    """One training step of the nested Luna MLM through the fused SDPA kernels only (flash or memory-efficient:
    no attention dropout) under bf16 autocast, against the CPU's float32 step: loss and gradient norm."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from luna_hf import LunaConfig, LunaForMaskedLM

    config = LunaConfig(vocab_size=512, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=1024, projected_length=16, max_position_embeddings=1026,
                        attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0)  # fmt: skip
    ids = torch.randint(3, 512, (2, 1024), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 700:] = 0

    def step(on: str):
        torch.manual_seed(0)
        model = LunaForMaskedLM(config).to(on).train()
        inputs = dict(input_ids=ids.to(on), attention_mask=mask.to(on), labels=ids.to(on))
        fused = on != "cpu"
        kernels = sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]) if fused else nullcontext()
        with kernels, torch.autocast(torch.device(on).type, torch.bfloat16, enabled=fused):
            loss = model(**inputs).loss
            loss.backward()
        norm = torch.linalg.vector_norm(
            torch.stack([p.grad.float().norm() for p in model.parameters() if p.grad is not None])
        )
        return float(loss), float(norm)

    (loss, norm), (cpu_loss, cpu_norm) = step(device), step("cpu")
    close = abs(loss - cpu_loss) <= 0.02 * cpu_loss and abs(norm - cpu_norm) <= 0.05 * cpu_norm
    return [f"Training step (2 x 1,024 tokens, one row padded), SDPA restricted to flash / memory-efficient on the "
            f"device: loss {loss:.4f} (CPU float32 {cpu_loss:.4f}), gradient norm {norm:.4f} (CPU {cpu_norm:.4f}): "
            f"{'ok' if close else '**FAILED**'}."]  # fmt: skip


def check_generation(device: str) -> list[str]:
    """`generate()` on the device gives the CPU's tokens, keeps its cache there, and decodes without host syncs."""
    import torch

    from luna_hf import LunaConfig, LunaForCausalLM
    from luna_hf.transformers_compat import CACHE_OUTPUT_NAME

    torch.manual_seed(0)
    model = LunaForCausalLM(LunaConfig(is_decoder=True, vocab_size=96, hidden_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, intermediate_size=128, projected_length=8,
                                       max_position_embeddings=258)).eval()  # fmt: skip
    prompt = torch.randint(3, 96, (2, 20), generator=torch.Generator().manual_seed(1))
    settings = dict(max_new_tokens=12, do_sample=False, return_dict_in_generate=True)
    expected = model.generate(prompt, **settings).sequences
    output = model.to(device).generate(prompt.to(device), **settings)
    cache = getattr(output, CACHE_OUTPUT_NAME)
    devices = {state.device.type for layer in cache.layers for state in layer.states}
    same = torch.equal(output.sequences.cpu(), expected)
    rows = [f"`generate()` (greedy, 12 tokens): the CPU's tokens: {same}; cache tensors on {sorted(devices)}: "
            f"{'ok' if same and devices == {torch.device(device).type} else '**FAILED**'}."]  # fmt: skip
    if device == "cpu":
        return rows + ["Host synchronisation per decoding step: not checked (CPU)."]
    token, syncs = output.sequences[:, -1:], "none"
    with torch.no_grad():
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(4):
                step = model(token, **{CACHE_OUTPUT_NAME: cache}, use_cache=True)
                token = step.logits[:, -1:].argmax(-1)
        except RuntimeError as error:
            syncs = f"**FAILED**: a step synchronises: {str(error).splitlines()[0]}"
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return rows + [f"Host synchronisation in 4 cached decoding steps (set_sync_debug_mode('error')): {syncs}."]


def run_checks(path: Path, device: str) -> None:
    """Phase a: each section is written to `path` as soon as it is known."""
    import huggingface_hub
    import torch
    import transformers

    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (dry run)"
    sections = [f"# luna-hf on {name}: correctness", "",
                f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, "
                f"huggingface_hub {huggingface_hub.__version__}, Python {sys.version.split()[0]}.", ""]  # fmt: skip
    for title, check in [("Every head: float32 against the CPU, bf16 autocast", check_heads),
                         ("Training step through the fused SDPA kernels", check_fused_training_step),
                         ("Generation on the device", check_generation)]:  # fmt: skip
        started = time.time()
        try:
            lines = check(device)
        except Exception as error:  # noqa: BLE001 (recorded; the other checks still run)
            lines = [f"**FAILED** with {type(error).__name__}: {error}"]
        sections += [f"## {title} ({time.time() - started:.1f} s)", "", *lines, ""]
        path.write_text("\n".join(sections))
        print("\n".join(sections[-len(lines) - 3 :]), flush=True)
    if "**FAILED**" in "\n".join(sections):
        sys.exit(f"A check failed: {path}")


def main():
    args = parse_args()
    results_dir = Path(args.results_dir).resolve()  # the phases run from the repository root
    results_dir.mkdir(parents=True, exist_ok=True)
    if args.phase == "checks":
        run_checks(results_dir / "gpu_checks.md", "cpu" if args.dry_run else "cuda")
        return
    log, started = Log(results_dir / "gpu_run.log"), time.time()
    log(f"gpu_run: results in {results_dir}, budget {args.budget_seconds:.0f} s, dry run: {args.dry_run}")
    outcomes = []
    for name, command, share in phases(args.dry_run, results_dir):
        left = args.budget_seconds - (time.time() - started)
        seconds = max(left * share, 5.0)
        if any(part.endswith("benchmark.py") for part in command):  # it stops starting runs in time to write reports
            command = [*command, "--deadline_seconds", f"{max(seconds - 40, 5):.0f}"]
        log(f"\n=== {name}: up to {seconds:.0f} s of the {left:.0f} s left\n$ {' '.join(command)}")
        outcomes.append((name, run_phase(command, seconds, log)))
        log(f"=== {name}: {outcomes[-1][1]}")
    log(f"\ngpu_run finished in {time.time() - started:.0f} s: " + "; ".join(f"{n}: {o}" for n, o in outcomes))
    log("files: " + ", ".join(sorted(path.name for path in results_dir.iterdir())))
    if any(outcome.startswith("failed") for _, outcome in outcomes):
        sys.exit(1)


if __name__ == "__main__":
    main()

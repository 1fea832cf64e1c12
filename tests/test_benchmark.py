"""Smoke test of scripts/benchmark.py: tiny models, two lengths, real subprocesses and limits; no timing assertions."""

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "benchmark.py"


def run_benchmark(output_dir: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(SCRIPT), "--output_dir", str(output_dir), "--threads", "1", "--warmup", "1",
               "--repeats", "2", "--min_repeats", "1", "--measure_seconds", "0.1", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def read_rows(output_dir: Path) -> dict:
    with open(output_dir / "results.csv") as handle:
        return {(row["model"], row["mode"], int(row["seq_len"])): row for row in csv.DictReader(handle)}


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("benchmark")
    # 150 MiB of growth: enough for the tiny Luna and floor at 2048 tokens (~60 MiB), not for RoBERTa's 2048 x 2048
    # attention maps in training (~280 MiB).
    run_benchmark(output_dir, "--size", "tiny", "--lengths", "64", "2048", "--models", "luna-16", "roberta-sdpa",
                  "floor", "--memory_limit_gb", "0.15", "--time_limit", "120")
    return output_dir


def test_every_configuration_is_a_row(grid):
    rows = read_rows(grid)
    assert set(rows) == {(model, mode, n) for model in ("luna-16", "roberta-sdpa", "floor")
                         for mode in ("train", "inference") for n in (64, 2048)}
    for key, row in rows.items():
        if key != ("roberta-sdpa", "train", 2048):
            assert row["status"] == "ok", row
            assert float(row["steps_per_s"]) > 0 and float(row["tokens_per_s"]) > 0
            assert 1 <= int(row["repeats"]) <= 2
            assert float(row["peak_mem_mib"]) >= 0


def test_memory_limit_is_recorded_as_oom(grid):
    row = read_rows(grid)["roberta-sdpa", "train", 2048]
    assert row["status"] == "oom", row
    assert "allocate" in row["error"]


def test_markdown_has_table_2_layout_and_targets(grid):
    text = (grid / "results.md").read_text()
    assert "| Model | steps/s 64 | steps/s 2K | memory 64 | memory 2K |" in text
    # The baseline against itself; then OOM where it ran out of memory, n/a for the others at that length.
    assert "| roberta-sdpa | 1.0 | OOM | 1.00 | OOM |" in text
    luna = next(line for line in text.splitlines() if line.startswith("| luna-16 |"))
    assert luna.count("n/a") == 2
    assert "128: Luna-16 step time" in text
    rows = read_rows(grid)
    luna, floor = rows[("luna-16", "train", 2048)], rows[("floor", "train", 2048)]
    # The floor's step is its feed-forward matmuls: 2 per layer, forward + 2x backward = 12 n d d_ff FLOPs per layer.
    assert float(floor["gflop"]) == pytest.approx(12 * 2048 * 64 * 256 * 2 / 1e9, rel=0.01)
    work = float(luna["gflop"]) / float(floor["gflop"])
    rate = float(luna["steps_per_s"]) / float(floor["steps_per_s"]) * work
    assert 1.2 < work < 2.0  # the FFN plus Luna's projections and its pack and unpack attentions
    assert (f"| 2K: Luna-16's FLOP rate relative to the attention-free floor's (a figure) | {rate:.2f} ({work:.2f}× "
            "the FLOPs) |") in text


def test_plots_are_written(grid):
    pytest.importorskip("matplotlib")
    for mode in ("train", "inference"):
        assert (grid / f"{mode}.png").read_bytes().startswith(b"\x89PNG")


def test_time_limit_is_recorded_and_longer_lengths_skipped(tmp_path):
    run_benchmark(tmp_path, "--size", "small", "--lengths", "4096", "8192", "--models", "roberta-eager",
                  "--modes", "train", "--time_limit", "0.5")
    rows = read_rows(tmp_path)
    assert rows["roberta-eager", "train", 4096]["status"] == "timeout"
    assert rows["roberta-eager", "train", 8192]["status"] == "skipped"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("benchmark_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bad_arguments_are_refused(script):
    with pytest.raises(ValueError, match="unknown model 'gpt'"):
        script.BenchmarkArguments(models=["gpt"])
    with pytest.raises(ValueError, match="min_repeats"):
        script.BenchmarkArguments(repeats=1, min_repeats=3)


def test_attention_free_floor_has_no_attention_parameters(script):
    floor = script.build_model("floor", "tiny", 64, 512)
    roberta = script.build_model("roberta-sdpa", "tiny", 64, 512)
    names = {name for name, _ in floor.named_parameters()}
    assert not any(".attention." in name for name in names)
    assert names < {name for name, _ in roberta.named_parameters()}


def test_checkpointing_variant_is_luna_16_with_recomputation(script):
    plain = script.build_model("luna-16", "tiny", 64, 512)
    recomputing = script.build_model("luna-16-checkpointing", "tiny", 64, 512)
    assert recomputing.is_gradient_checkpointing and not plain.is_gradient_checkpointing
    assert recomputing.config.projected_length == 16 == plain.config.projected_length
    assert plain.state_dict().keys() == recomputing.state_dict().keys()


def test_sparse_mlm_compares_the_two_heads(tmp_path):
    run_benchmark(tmp_path, "--sparse_mlm", "--mlm_presets", "luna-small", "--lengths", "32", "--min_repeats", "2")
    rows = [line for line in (tmp_path / "sparse_mlm.md").read_text().splitlines() if line.startswith("| luna-small")]
    assert len(rows) == 1 and rows[0].startswith("| luna-small | 4×256, FFN 1024, l=32 | 8,192 | 1×32 | "), rows
    dense, sparse, speedup, steps, memory = rows[0].split(" | ")[4:9]  # numbers, not a failure status
    assert float(dense.replace(",", "")) > 0 and float(sparse.replace(",", "")) > 0 and speedup.endswith("×")
    assert steps == "2 each" and " / " in memory


def test_max_length_search_doubles_then_bisects_with_real_steps(tmp_path):
    """Tiny models in 0.15 GiB: RoBERTa's n x n maps stop it long before Luna; every verdict is a real step."""
    import re

    run_benchmark(tmp_path, "--max_length_search", "--search_size", "tiny", "--search_models", "luna-16",
                  "roberta-sdpa", "--search_start", "512", "--search_stop", "16384", "--search_resolution", "512",
                  "--search_memory_gb", "0.15", "--time_limit", "120")
    report = (tmp_path / "max_length.md").read_text()
    longest = {}
    for name, fits, fails in re.findall(r"\*\*(\S+)\*\*: \*\*([\d,]+) tokens\*\* fit; ([\d,]+) do not", report):
        fits, fails = int(fits.replace(",", "")), int(fails.replace(",", ""))
        section = report.split(f"**{name}**")[1].split("\n\n**")[0]
        results = {int(n.replace(",", "")): result for n, result in re.findall(r"\| ([\d,]+) \| (\w+) \|", section)}
        assert results[fits] == "ok" and results[fails] == "OOM" and 0 < fails - fits <= 512
        assert [n for n, result in results.items() if result == "ok" and n > fits] == []
        assert results[512] == "ok" and list(results)[:2] == [512, 1024]  # it doubled from --search_start
        longest[name] = fits
    assert set(longest) == {"luna-16", "roberta-sdpa"}
    assert longest["luna-16"] >= 4 * longest["roberta-sdpa"]


def test_modernbert_baseline_has_the_same_shape_and_feed_forward_size(script):
    modernbert = script.build_model("modernbert", "small", 256, 512)
    roberta = script.build_model("roberta-sdpa", "small", 256, 512)
    config = modernbert.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (256, 4, 4)
    assert "sliding_attention" in config.layer_types and "full_attention" in config.layer_types
    modernbert_ffn = sum(p.numel() for n, p in modernbert.named_parameters() if ".mlp.W" in n)
    roberta_ffn = sum(p.numel() for n, p in roberta.named_parameters()
                      if n.endswith(("intermediate.dense.weight", "output.dense.weight")) and ".attention." not in n)
    assert abs(modernbert_ffn - roberta_ffn) / roberta_ffn < 0.01  # I = 2/3 FFN, rounded down


@pytest.fixture(scope="module")
def seq2seq_script():
    spec = importlib.util.spec_from_file_location("benchmark_seq2seq", SCRIPT.parent / "benchmark_seq2seq.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_seq2seq_decoding_cache_is_constant_for_luna_and_grows_with_the_source_for_the_transformer(seq2seq_script):
    args = seq2seq_script.Seq2SeqBenchmarkArguments(
        sources=[8, 96], models=["luna-4", "transformer"], rounds=1, new_tokens=2, warmup_tokens=1, hidden_size=32,
        layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100,
    )
    rows = {(row["model"], row["source"]): row for name in args.models
            for row in seq2seq_script.measure_decoding(args, name)}  # fmt: skip
    luna, transformer = (cache["cache_mib"] for cache in (rows["luna-4", 8], rows["transformer", 8]))
    assert rows["luna-4", 96]["cache_mib"] == luna > 0  # l = 4 slots per layer, whatever the source
    assert rows["transformer", 96]["cache_mib"] > 8 * transformer  # cross-attention keys/values of every source token
    report = seq2seq_script.report(args, "command", list(rows.values()))
    assert "| 96 |" in report and "luna-4: per-token latency at a 96-token source / at 8" in report


def test_seq2seq_benchmark_refuses_unknown_models(seq2seq_script):
    with pytest.raises(ValueError, match="'gpt'"):
        seq2seq_script.Seq2SeqBenchmarkArguments(models=["gpt"])

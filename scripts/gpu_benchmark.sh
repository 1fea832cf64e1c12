#!/usr/bin/env bash
# The GPU measurement in one short run (about 8 minutes on one H100), for a session that is lent a GPU:
#   bash scripts/gpu_benchmark.sh            # -> benchmarks/results/gpu_results.{csv,md,png}, gpu_max_length.md
# Base size, bf16 autocast, batch 1, 1K-32K tokens: Luna-16 and Luna-128 against RoBERTa with SDPA (flash when
# attention dropout is 0), with its default math path (dropout 0.1) and with FlexAttention. The card's name is
# recorded in the tables. Then the longest base-size training sequence on the card (Luna-16, checkpointing on/off).
set -euo pipefail
cd "$(dirname "$0")/.."
python scripts/benchmark.py --device cuda --size base --dtype bfloat16 --modes train inference \
    --lengths 1024 2048 4096 8192 16384 32768 --models luna-16 luna-128 roberta-sdpa roberta-sdpa-nodrop roberta-flex \
    --warmup 2 --repeats 10 --min_repeats 3 --measure_seconds 2 --time_limit 60 --memory_limit_gb 70
python scripts/benchmark.py --device cuda --dtype bfloat16 --max_length_search \
    --search_models luna-16 luna-16-checkpointing --search_start 32768 --search_stop 1048576 \
    --search_resolution 16384 --time_limit 60

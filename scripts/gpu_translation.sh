#!/usr/bin/env bash
# The encoder-decoder's GPU measurements in one run (about 9 minutes on one H200), for a session lent a GPU:
#   bash scripts/gpu_translation.sh RESULTS_DIR [DATA_DIR] [TOKENIZER_DIR]
# 1. Per-token decoding latency by source length (6 + 6 layers x 512, batch 1, greedy), Luna-16/32 against Marian
#    with its KV cache: benchmarks/results/seq2seq_decoding.md's measurement on the GPU, then 64K and 128K sources.
# 2. Translation at equal steps: Marian, Luna-16 and Luna-32 (tied K/V), 3 + 3 layers x 256, trained side by side (one
#    process each) on DATA_DIR (scripts/prepare_parallel_corpus.py) with one tokenizer (a run_translation.py output
#    folder), the same steps, batch and seed, scored on the whole test split with beam search. The step count comes
#    from a 100-step pilot of all three: as many as the slowest model runs before BUDGET seconds, keeping aside the
#    time to predict the test split (measured in the pilot).
# Outputs: RESULTS_DIR/seq2seq_decoding_gpu*.md, RESULTS_DIR/translation_gpu.md; runs under WORK_DIR.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${1:?usage: gpu_translation.sh RESULTS_DIR [DATA_DIR] [TOKENIZER_DIR]}
DATA=${2:-data/parallel/debian-en-de}
TOKENIZER=${3:-outputs/translation-marian}
WORK=${WORK_DIR:-outputs/gpu-translation}
BUDGET=${BUDGET:-540}  # seconds for the whole script
START=$SECONDS
mkdir -p "$RESULTS" "$WORK"

timeout 150 python scripts/benchmark_seq2seq.py --device cuda --output "$RESULTS/seq2seq_decoding_gpu.md"
timeout 150 python scripts/benchmark_seq2seq.py --device cuda --sources 128 65536 131072 \
    --models luna-16 transformer --output "$RESULTS/seq2seq_decoding_gpu_long.md"

COMMON=(--train_file "$DATA/train.json" --test_file "$DATA/test.json" --tokenizer_name "$TOKENIZER"
    --source_lang en --target_lang de --max_source_length 128 --max_target_length 128
    --d_model 256 --layers 3 --heads 4 --ffn_dim 1024 --learning_rate 5e-4 --per_device_train_batch_size 64
    --per_device_eval_batch_size 256 --seed 42 --eval_strategy no --save_strategy no --report_to none
    --logging_steps 100 --disable_tqdm true)
MODELS=("marian" "luna 16" "luna 32")

run_all() {  # run_all NAME_SUFFIX ARGS...: the three models side by side, one process each
    local suffix=$1 pids=() spec type length name
    shift
    for spec in "${MODELS[@]}"; do
        read -r type length <<<"$spec"
        name=$type${length:+-$length}
        python scripts/run_translation.py "${COMMON[@]}" --model_type "$type" ${length:+--projected_length $length} \
            --output_dir "$WORK/$name$suffix" "$@" >"$WORK/$name$suffix.log" 2>&1 &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid" || echo "a run failed: see $WORK/*$suffix.log"; done
}

# The pilot also predicts 512 test rows untrained: every beam runs to the length limit, the slowest case.
run_all -pilot --do_train --max_steps 100 --do_predict --predict_with_generate --num_beams 4 --max_predict_samples 512
STEPS=$(python - "$WORK" "$((BUDGET - (SECONDS - START)))" "$(wc -l <"$DATA/test.json")" <<'EOF'
import json, sys
from pathlib import Path
work, seconds, test_rows = Path(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
runs = [json.loads(path.read_text()) for path in work.glob("*-pilot/translation_results.json")]
if len(runs) == 3:
    predict = max(run["predict_runtime"] for run in runs) * test_rows / 512
    train = seconds - 60 - 1.2 * predict  # 60 s: start, data, saving
    steps = int(train * min(run["train_steps_per_second"] for run in runs)) // 100 * 100
    print(f"predicting the test split: about {predict:.0f} s; {train:.0f} s left to train", file=sys.stderr)
    print(max(steps, 300))
else:
    print(0)
EOF
)
echo "pilot done at $((SECONDS - START)) s: $STEPS steps for each model"
[ "$STEPS" -gt 0 ] || { echo "a pilot run failed: the translation runs are skipped"; exit 1; }
run_all "" --do_train --do_predict --predict_with_generate --num_beams 4 --max_steps "$STEPS" \
    --warmup_steps $((STEPS / 10))

python - "$WORK" "$RESULTS/translation_gpu.md" "$DATA" "$STEPS" <<'EOF'
import json, sys
import torch
from pathlib import Path
work, output, data, steps = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
lines = [f"# Translation at equal steps on {torch.cuda.get_device_name()} ({data}, whole test split, beam 4)", "",
         "| model | steps | test BLEU | test chrF | train s | predict s | wall s |", "|---|---:|---:|---:|---:|---:|---:|"]
for name in ("marian", "luna-16", "luna-32"):
    path = work / name / "translation_results.json"
    if not path.exists():
        lines.append(f"| {name} | failed: see {work / name}.log | | | | | |")
        continue
    r = json.loads(path.read_text())
    lines.append(f"| {name} | {steps} | {r['predict_bleu']:.2f} | {r['predict_chrf']:.2f} | "
                 f"{r['train_runtime']:.0f} | {r['predict_runtime']:.0f} | {r['wall_time_seconds']:.0f} |")
output.write_text("\n".join(lines) + "\n")
print(output.read_text())
EOF
echo "done in $((SECONDS - START)) s"

#!/usr/bin/env bash
# The GLUE table's runs for one task and seed (docs/finetuning.md, "SST-2, QNLI, QQP: converted MiniLM against its
# teacher"): the quickstart's post-hoc recipe with one budget per task for all three models. MiniLM is finetuned (the
# teacher); the finetuned model is converted to the learned kernel (m = 64) and to nested Luna (l = 16), their new
# attention transferred on the task's training texts (200 steps of 16), then finetuned with the teacher's budget while
# distilling its predictions. Each model's dev result is appended to benchmarks/results/glue/<task>.jsonl (settings,
# seed, metrics, wall time); scripts/glue_report.py makes the table. One torch thread per run.
#
#   bash scripts/glue_posthoc.sh qnli 42 outputs/glue path/to/all-MiniLM-L6-v2
set -euo pipefail
task=$1 seed=$2 out=$3 minilm=$4
glue=${GLUE_DIR:-../shared/data/glue}
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
case $task in  # the training subset, the evaluation set, the length, the texts the attention transfer reads
  sst2) train=$glue/sst2/train.tsv dev=$glue/sst2/dev.tsv length=64 texts=sentence ;;
  qnli) train=$glue/qnli/train_subset.tsv dev=$glue/qnli/dev.tsv length=128 texts=sentence ;;
  qqp) train=$glue/qqp/train_subset.tsv dev=$glue/qqp/heldout_subset.tsv length=64 texts=question1 ;;
  *) echo "unknown task $task (sst2, qnli, qqp)" >&2; exit 2 ;;
esac
steps=300 batch=32 learning_rate=1e-4 transfer_steps=200
run=$out/$task-seed$seed
mkdir -p "$run" benchmarks/results/glue

finetune() {  # finetune MODEL OUTPUT [--teacher_name_or_path TEACHER]
  local model=$1 output=$2
  shift 2
  [ -f "$output/eval_results.json" ] && return
  python scripts/finetune_glue.py --model_name_or_path "$model" --task_name "$task" --train_file "$train" \
    --validation_file "$dev" --do_train --do_eval --max_seq_length "$length" --per_device_train_batch_size "$batch" \
    --learning_rate "$learning_rate" --warmup_steps 0.06 --weight_decay 0.01 --max_steps "$steps" \
    --eval_strategy no --save_strategy no --report_to none --seed "$seed" --output_dir "$output" \
    --disable_tqdm true "$@"
}

record() {  # record MODEL_NAME FOLDER SECONDS
  python - "$task" "$seed" "$1" "$2" "$3" "$steps" "$batch" "$learning_rate" "$length" "$transfer_steps" "$dev" \
    >> "benchmarks/results/glue/$task.jsonl" <<'EOF'
import json, sys
task, seed, model, folder, seconds, steps, batch, lr, length, transfer, dev = sys.argv[1:]
metrics = json.load(open(f"{folder}/eval_results.json"))
print(json.dumps({"task": task, "seed": int(seed), "model": model, "metrics": metrics, "wall_seconds": int(seconds),
                  "settings": {"finetune_steps": int(steps), "batch": int(batch), "learning_rate": float(lr),
                               "max_seq_length": int(length), "transfer_steps": int(transfer), "evaluated_on": dev}}))
EOF
}

start=$SECONDS
finetune "$minilm" "$run/teacher"
record minilm "$run/teacher" $((SECONDS - start))
for attention in learned_kernel nested; do
  start=$SECONDS
  if [ $attention = nested ]; then shape=(--projected_length 16) rate=1e-3; else shape=(--kernel_num_projections 64) rate=1e-2; fi
  [ -d "$run/$attention" ] || python scripts/convert_to_luna.py --model_name_or_path "$run/teacher" \
    --output_dir "$run/$attention" --attention $attention "${shape[@]}" --seed "$seed"
  [ -d "$run/$attention-attn" ] || python scripts/transfer_attention.py --model_name_or_path "$run/$attention" \
    --teacher_name_or_path "$run/teacher" --train_file "$train" --text_column $texts \
    --max_samples $((16 * transfer_steps)) --max_length "$length" --max_steps $transfer_steps \
    --per_device_train_batch_size 16 --learning_rate $rate --report_to none --seed "$seed" --save_strategy no \
    --output_dir "$run/$attention-checkpoints" --transferred_model_dir "$run/$attention-attn" --disable_tqdm true
  finetune "$run/$attention-attn" "$run/$attention-distilled" --teacher_name_or_path "$run/teacher"
  record $attention "$run/$attention-distilled" $((SECONDS - start))
done

#!/usr/bin/env bash
# The GLUE table's runs for one task and seed (docs/finetuning.md, "SST-2, QNLI, QQP: converted MiniLM against its
# teacher"), every model at the teacher's budget. Two routes:
#
#   bash scripts/glue_runs.sh qnli 42 outputs/glue path/to/all-MiniLM-L6-v2
#     post hoc: MiniLM is finetuned (the teacher); the finetuned model is converted to the learned kernel (m = 64)
#     and to nested Luna (l = 16), their new attention transferred on the task's training texts (200 steps of 16;
#     a pair task's pairs, read as the model reads them, or one of its columns: TRANSFER_COLUMNS=sentence for QNLI,
#     question1 for QQP), then finetuned with the teacher's budget while distilling its predictions.
#   bash scripts/glue_runs.sh qnli 42 outputs/glue path/to/all-MiniLM-L6-v2 data/corpus/train.txt
#     convert once: MiniLM itself is converted and its attention transferred once per seed on general text (the
#     corpus's documents cut into sentences, passages and pairs; 1,200 steps of 16, kept in OUTPUT/general-seedS and
#     reused by every task), then finetuned on the task exactly like the teacher (no distillation).
#
#   bash scripts/glue_runs.sh brown_genres 0 outputs/long path/to/all-MiniLM-L6-v2 data/corpus-news/train.txt
#     long documents (LONG_DIR, default data/brown-genres, from scripts/prepare_long_documents.py): MiniLM reads a
#     document's first 512 tokens; the learned kernel (m = 16) with positions copied to 4,096, its attention
#     transferred once (seed 0, 200 steps of 8 texts of 256 tokens, kept in OUTPUT/long-documents for every seed:
#     run the first seed alone), reads the whole document. Both finetuned end to end at one budget (two passes over
#     the 350 documents, batch 4).
#
# ATTENTIONS="learned_kernel" (default "learned_kernel nested") picks the converted models; ATTENTIONS="" trains the
# teacher only. PROJECTED_LENGTH sets nested Luna's l (default 16; another l has folders of its own, and the records
# carry it). TRANSFER_STEPS overrides the transfer's steps (a transferred folder already there is reused: delete it,
# or use another OUTPUT, to transfer again). Each model's dev result is appended once (OUTPUT/.../recorded marks it)
# to RECORDS/<task>.jsonl with its settings, seed, metrics and wall time; RECORDS defaults to the table's folder,
# benchmarks/results/glue (another keeps a side experiment's records apart); scripts/glue_report.py makes the table.
# One torch thread per run. A finished step is skipped when the command is run again.
set -euo pipefail
task=$1 seed=$2 out=$3 minilm=$4 corpus=${5:-}
glue=${GLUE_DIR:-../shared/data/glue} records=${RECORDS:-benchmarks/results/glue}
attentions=${ATTENTIONS-learned_kernel nested} projected_length=${PROJECTED_LENGTH:-16}
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
case $task in  # the training subset, the evaluation set, the length, the column(s) the post-hoc transfer reads
  sst2) train=$glue/sst2/train.tsv dev=$glue/sst2/dev.tsv length=64 columns=sentence ;;
  qnli) train=$glue/qnli/train_subset.tsv dev=$glue/qnli/dev.tsv length=128 columns="question sentence" ;;
  qqp) train=$glue/qqp/train_subset.tsv dev=$glue/qqp/heldout_subset.tsv length=64 columns="question1 question2" ;;
  brown_genres) train=${LONG_DIR:-data/brown-genres}/train.jsonl dev=${LONG_DIR:-data/brown-genres}/test.jsonl ;;
  *) echo "unknown task $task (sst2, qnli, qqp, brown_genres)" >&2; exit 2 ;;
esac
pair=${columns:-}
read -ra columns <<< "${TRANSFER_COLUMNS:-$pair}"
if [ -n "${TRANSFER_COLUMNS:-}" ] && [ "${columns[*]}" != "$pair" ]; then  # one of the task's columns, checked now
  [ ${#columns[@]} = 1 ] && head -n 1 "$train" | tr '\t' '\n' | grep -qxF "${columns[0]}" || {
    echo "TRANSFER_COLUMNS must be one column of $train or the task's pair in its order ($pair)" >&2; exit 2; }
fi
steps=300 batch=32 learning_rate=1e-4 luna_length=${length:-} long="" glue_task=$task
if [ -n "$corpus" ]; then transfer_steps=${TRANSFER_STEPS:-1200} route=general
else transfer_steps=${TRANSFER_STEPS:-200} route=posthoc; fi
transfer_batch=16 transfer_length=128
transfer_texts=(--passages true --passages_seed "$seed" --max_samples $((16 * transfer_steps)))
if [ $task = brown_genres ]; then  # the converted model reads the whole document; news articles for its transfer
  [ -n "$corpus" ] || { echo "brown_genres needs the corpus (the convert-once route)" >&2; exit 2; }
  case ${ATTENTIONS-learned_kernel} in
    learned_kernel | "") ;;
    *) echo "brown_genres runs the learned kernel only (ATTENTIONS=learned_kernel)" >&2; exit 2 ;;
  esac
  steps=176 batch=4 learning_rate=2e-4 length=512 luna_length=4096 transfer_steps=${TRANSFER_STEPS:-200}
  transfer_batch=8 transfer_length=256 transfer_texts=() long=-4096 attentions=${ATTENTIONS-learned_kernel} glue_task=""
fi
run=$out/$task-seed$seed
mkdir -p "$run" "$records"

finetune() {  # finetune NAME MODEL OUTPUT START [--teacher_name_or_path TEACHER]: train, evaluate, record once
  local name=$1 model=$2 output=$3 start=$4 length=$length
  shift 4
  [ -f "$output/recorded" ] && return
  [ $name = minilm ] || length=$luna_length
  [ -f "$output/eval_results.json" ] || python scripts/finetune_glue.py --model_name_or_path "$model" \
    ${glue_task:+--task_name "$glue_task"} --train_file "$train" --validation_file "$dev" --do_train --do_eval \
    --max_seq_length "$length" --per_device_train_batch_size "$batch" --learning_rate "$learning_rate" \
    --warmup_steps 0.06 --weight_decay 0.01 --max_steps "$steps" \
    --eval_strategy no --save_strategy no --report_to none --seed "$seed" --output_dir "$output" \
    --disable_tqdm true "$@"
  python - "$task" "$seed" "$name" "$output" $((SECONDS - start)) "$steps" "$batch" "$learning_rate" "$length" \
    "$dev" "$route" "${transfer_steps:-0}" "${corpus:-$train}" "${columns[*]:-}" \
    >> "$records/$task.jsonl" <<'EOF'
import json, sys
task, seed, model, folder, seconds, steps, batch, lr, length, dev, route, transfer, texts, columns = sys.argv[1:]
metrics = json.load(open(f"{folder}/all_results.json"))
transfer = {} if model == "minilm" else {"route": route, "transfer_steps": int(transfer), "transferred_on": texts}
config = json.load(open(f"{folder}/config.json"))  # the converted attention's size, as the model has it
size = {"nested": "projected_length", "learned_kernel": "kernel_num_projections"}.get(config.get("attention_type"))
if size and transfer:
    transfer[size] = config[size]
if transfer and route == "posthoc":  # the task's column(s) the transfer read: two are read as the model reads a pair
    transfer["transfer_columns"] = columns.split()
print(json.dumps({"task": task, "seed": int(seed), "model": model, "metrics": metrics, "wall_seconds": int(seconds),
                  "settings": {"finetune_steps": int(steps), "batch": int(batch), "learning_rate": float(lr),
                               "max_seq_length": int(length), "evaluated_on": dev, **transfer}}))
EOF
  touch "$output/recorded"  # a run that failed after its evaluation is recorded by the next call, not lost
}

transfer() {  # transfer STUDENT TEACHER OUTPUT RATE ARGS...: the attention transfer, once
  local student=$1 teacher=$2 output=$3 rate=$4
  shift 4
  [ -d "$output" ] || python scripts/transfer_attention.py --model_name_or_path "$student" \
    --teacher_name_or_path "$teacher" --max_steps $transfer_steps --per_device_train_batch_size $transfer_batch \
    --learning_rate "$rate" --report_to none --seed "$seed" --save_strategy no --output_dir "$output-checkpoints" \
    --transferred_model_dir "$output" --disable_tqdm true "$@"
}

convert() {  # convert SOURCE OUTPUT ATTENTION
  local shape=(--kernel_num_projections 64)
  [ "$3" = nested ] && shape=(--projected_length "$projected_length")
  [ -n "$long" ] && shape=(--max_position_embeddings 4096)  # the learned kernel's default m = 16
  [ -d "$2" ] || python scripts/convert_to_luna.py --model_name_or_path "$1" --output_dir "$2" --attention "$3" \
    "${shape[@]}" --seed "$seed"
}

finetune minilm "$minilm" "$run/teacher" $SECONDS
for attention in $attentions; do
  start=$SECONDS rate=1e-2
  [ $attention = nested ] && rate=1e-3
  folder=$attention
  [ $attention = nested ] && [ "$projected_length" != 16 ] && folder=nested-l$projected_length
  if [ $route = posthoc ]; then
    convert "$run/teacher" "$run/$folder" $attention
    on=${columns[*]} && on=-on-${on// /-}  # a transfer on other columns has its own folders
    transfer "$run/$folder" "$run/teacher" "$run/$folder-attn$on" $rate --train_file "$train" \
      --text_column "${columns[0]}" ${columns[1]:+--text_pair_column "${columns[1]}"} \
      --max_samples $((16 * transfer_steps)) --max_length "$length"
    finetune $attention "$run/$folder-attn$on" "$run/$folder-distilled$on" $start \
      --teacher_name_or_path "$run/teacher"
  else  # the shared transfer's time is not in the task's row (its log has it): a user pays it once
    general=$out/general-seed$seed
    [ -n "$long" ] && general=$out/long-documents seed=0  # converted and transferred once, for every seed
    convert "$minilm" "$general/$folder$long" $attention
    transfer "$general/$folder$long" "$minilm" "$general/$folder$long-attn" $rate --train_file "$corpus" \
      "${transfer_texts[@]}" --max_length $transfer_length
    seed=$2 start=$SECONDS
    finetune "${attention}_general$long" "$general/$folder$long-attn" "$run/$folder-general$long" $start
  fi
done

#!/usr/bin/env bash
# One run of the equal-step LRA comparison on a 2-core CPU (docs/lra.md, "Equal steps on the small harness"):
# `run_lra.py --config small` (the Skyformer / Nystromformer harness's model and optimiser) at the input length,
# batch, steps and learning rate chosen for this CPU, the same for every model of a task. One thread per run; two
# runs at a time. Results are appended to benchmarks/results/lra/equal_steps.jsonl; an interrupted run continues
# when the same command is given again.
#
#   scripts/lra/equal_steps.sh TASK MODEL SEED      # TASK: image | listops | text | retrieval | pathfinder
#                                                  # MODEL: transformer | luna | luna-pmean | learned-kernel
set -euo pipefail

main() {
  local task=$1 model=$2 seed=$3 data_dir=${LRA_DATA:-data/lra}
  local settings model_flags name folder length batch steps warmup lr
  # task: data folder, input length, batch, steps, warm-up, learning rate (why these: docs/lra.md)
  case $task in
    image)      settings=(image 1024 16 600 60 1e-3) ;;
    listops)    settings=(listops512 512 32 1000 100 1e-3) ;;
    text)       settings=(text 1024 16 1200 120 1e-3) ;;
    retrieval)  settings=(retrieval 512 16 2000 200 2e-3) ;;  # 512 bytes per document, two documents per example
    pathfinder) settings=(pathfinder 1024 16 600 60 2e-3) ;;
    *) echo "No equal-step settings for task '$task' (see docs/lra.md)." >&2; exit 2 ;;
  esac
  read -r folder length batch steps warmup lr <<< "${settings[*]}"

  case $model in
    transformer)    model_flags=(--model transformer) ; name=transformer ;;
    luna)           model_flags=(--model luna --projected_length 16) ; name=luna16 ;;
    luna-pmean)     model_flags=(--model luna --projected_length 16 --classifier_pooling packed_mean)
                    name=luna16-pmean ;;
    learned-kernel) model_flags=(--model learned-kernel) ; name=learned-kernel ;;
    *) echo "MODEL must be transformer, luna, luna-pmean or learned-kernel, got '$model'." >&2; exit 2 ;;
  esac

  local output_dir=outputs/lra/equal-steps/$task-$name-s$seed resume=()
  if compgen -G "$output_dir/checkpoint-*" > /dev/null; then resume=(--resume_from_checkpoint latest); fi

  OMP_NUM_THREADS=1 python scripts/lra/run_lra.py --config small --task "$task" --data_dir "$data_dir/$folder" \
    "${model_flags[@]}" --seed "$seed" --threads 1 --max_length "$length" --batch_size "$batch" \
    --max_steps "$steps" --warmup_steps "$warmup" --learning_rate "$lr" --eval_steps 100 --max_eval_samples 500 \
    --max_test_samples 2000 --disable_tqdm True --output_dir "$output_dir" "${resume[@]}" \
    --results_file benchmarks/results/lra/equal_steps.jsonl
}

main "$@"  # the whole file is read before anything runs: editing it cannot disturb a run in progress

#!/bin/bash
# Issue #23's decision sweep: Flow-GRPO, AC-Flow with V = 0, AC-Flow with the latent critic (the original design)
# and AC-Flow with the look-ahead critic (2-step look-ahead, TD advantages), on two tasks (JPEG compressibility;
# the credit-assignment task red_jpeg), kl_coef 0.15 and 0.5 nats per image, 40 iterations of 64 images (2,560
# images per run), every arm at the same image budget; acflow arms 1 actor Adam step per iteration (inner_epochs 1,
# minibatch 64), grpo its frontier settings.
#   bash samples/bench/critic_sweep/run.sh OUT_DIR [CORES_PER_TASK]        (QUICK=1: 2 iterations, a smoke check)
# The two tasks run side by side, each one `flowalign bench train` on its own CPU cores (taskset); seeds 0-2 first,
# then seed 3 (a re-run skips finished runs, so an interrupted sweep keeps every finished run). Then, for each task:
#   flowalign bench train <same flags> --seeds 0 1 2 3 --report-only --compare acflow_lookahead --baseline acflow_v0
OUT=${1:?usage: run.sh OUT_DIR [CORES_PER_TASK]}
CORES=${2:-$(( $(nproc) / 2 ))}
ITER=40; EXTRA=()
if [ -n "$QUICK" ]; then ITER=2; EXTRA=(--set eval_prompts=2 --set prompts_per_iteration=2 --set critic_warmup_iterations=1); fi
ARMS=(--methods grpo acflow_v0=acflow acflow_latent=acflow acflow_lookahead=acflow
      --set acflow_v0:critic=zero --set acflow_latent:critic=latent
      --set acflow_lookahead:critic=lookahead --set acflow_lookahead:advantage_estimator=td
      --set acflow_lookahead:critic_lookahead_steps=2)
COMMON=(--kl 0.15 0.5 --iterations $ITER --workers $CORES --set mixed_precision=no
        --set acflow:inner_epochs=1 --set acflow:minibatch_size=64 "${EXTRA[@]}"
        --compare acflow_lookahead --baseline acflow_v0 --json)
declare -A TASK=([jpeg]=samples/configs/frontier_jpeg.yaml [credit]=samples/configs/credit_red_jpeg.yaml)
slot=0; pids=()
for task in jpeg credit; do
  first=$(( slot * CORES )); cores="$first-$(( first + CORES - 1 ))"
  mkdir -p "$OUT/$task"
  echo "python3 -m flowalign bench train --config ${TASK[$task]} ${ARMS[*]} ${COMMON[*]} --out $OUT/$task --seeds 0 1 2 [then 0 1 2 3]" > "$OUT/$task/command.txt"
  ( for seeds in "0 1 2" "0 1 2 3"; do
      taskset -c "$cores" python3 -m flowalign bench train --config "${TASK[$task]}" "${ARMS[@]}" "${COMMON[@]}" \
          --out "$OUT/$task" --seeds $seeds || exit 1
    done ) > "$OUT/$task/log.txt" 2>&1 &
  pids+=($!); slot=$((slot + 1))
done
fail=0
for p in "${pids[@]}"; do wait "$p" || fail=$((fail + 1)); done
echo "sweep finished: $fail task(s) failed"

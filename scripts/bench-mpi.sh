#!/usr/bin/env bash
# Meta-training throughput on one process (all cores) and on NP MPI ranks (cores/NP threads each), same
# global batch: the sample editor's configuration with episode lengths uniform in 1..L, EPISODES a step.
# Usage: scripts/bench-mpi.sh [L...]   (env: NP=2 EPISODES=2 STEPS=25 DAFNET=.build/release/dafnet)
set -euo pipefail
cd "$(dirname "$0")/.."
NP=${NP:-2}; EPISODES=${EPISODES:-2}; STEPS=${STEPS:-25}; DAFNET=${DAFNET:-.build/release/dafnet}
lengths=("$@"); [ ${#lengths[@]} -gt 0 ] || lengths=(10 100)
cores=$(nproc)
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
head -300 samples/world/heldout_text.txt > "$work/stats.txt"
# Open MPI refuses root unless told; containers often lack the ptrace rights of its single-copy path.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_btl_vader_single_copy_mechanism=none
rate() {  # the mean episodes/s of the log lines after the first (the first window fills the signal cache)
  grep -o '[0-9.]* episodes/s' "$1" | tail -n +2 | awk '{s += $1; n++} END {if (n) printf "%.3f", s / n; else print "-"}'
}
printf '%-8s %-28s %-14s %s\n' length run episodes/s steps/s
for L in "${lengths[@]}"; do
  sed -e "s/\"max_seq\" *: *[0-9]*/\"max_seq\": $L, \"curriculum_start\": $L, \"episodes_per_step\": $EPISODES/" \
      -e "s/\"steps\" *: *[0-9]*/\"steps\": $STEPS/" -e 's/"checkpoint_every" *: *[0-9]*/"checkpoint_every": 100000/' \
      -e 's/"log_every" *: *[0-9]*/"log_every": 5/' -e 's/"plateau_patience" *: *[0-9]*/"plateau_patience": 100000/' \
      samples/editor.config.json > "$work/config.json"
  common=(train-editor --config "$work/config.json" --stats-text "$work/stats.txt" --no-eval)
  OPENBLAS_NUM_THREADS=$cores "$DAFNET" "${common[@]}" --run-dir "$work/np1-$L" 2>/dev/null
  r1=$(rate "$work/np1-$L/train.log")
  mpirun --oversubscribe -np "$NP" "$DAFNET" "${common[@]}" --run-dir "$work/np$NP-$L" 2>/dev/null
  r2=$(rate "$work/np$NP-$L/train.log")
  printf '%-8s %-28s %-14s %s\n' "$L" "1 process, $cores threads" "$r1" "$(awk -v r="$r1" -v e="$EPISODES" 'BEGIN {printf "%.3f", r / e}')"
  printf '%-8s %-28s %-14s %s\n' "$L" "$NP ranks, $((cores / NP > 0 ? cores / NP : 1)) thread(s) each" "$r2" "$(awk -v r="$r2" -v e="$EPISODES" 'BEGIN {printf "%.3f", r / e}')"
done

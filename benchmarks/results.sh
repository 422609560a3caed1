#!/usr/bin/env bash
# Reproduces docs/results.md: hfr / none / hipi / hipi-q / random x seeds 0-4 on four-corners,
# and hfr / none seeds 5-8
# with the `cpu` preset (17-19 min per run on one core), the sparse-point-robot comparison
# (sparse critic: hfr / none / hipi, seeds 0-4, and hfr / none seeds 5-20; dense critic: none, seeds 0-4),
# then the figures and tables.
#
#   bash benchmarks/results.sh            # 85 runs, 2 at a time: about 15 h on 2 cores
#   WORKERS=8 bash benchmarks/results.sh  # on a bigger machine
#   BACKEND=ray RAY_ADDRESS=host:6379 bash benchmarks/results.sh   # on a Ray cluster
#
# hfr and none run first (all seeds), then the other three.  The sweep is resumable: run the
# script again after an interruption and finished runs are skipped, interrupted ones resume
# from their last checkpoint.  Finished runs' small files are copied to $OUT/runs (never
# deleted there: runs committed by another machine stay).
set -euo pipefail
ROOT=${ROOT:-runs/cpu}
OUT=${OUT:-docs/results}
WORKERS=${WORKERS:-2}
BACKEND=${BACKEND:-local}
EXTRA=()
[[ -n "${RAY_ADDRESS:-}" ]] && EXTRA=(--ray-address "$RAY_ADDRESS")
[[ -n "${GPUS_PER_RUN:-}" ]] && EXTRA+=(--gpus-per-run "$GPUS_PER_RUN")

# Every run of the campaign took the lean gradient step (grad_step=auto, the default until the
# compiled step became the default for long CPU runs as grad_step=fast): STEP keeps new seeds
# on the same step as the committed ones (a sweep refuses run directories whose config differs).
STEP=(--set grad_step=auto)

sweep() {  # sweep STRATEGIES [SEEDS]
    time metarelabel sweep --families four-corners --relabel "$1" --seeds "${2:-0,1,2,3,4}" --preset cpu \
        --root "$ROOT" --workers "$WORKERS" --backend "$BACKEND" "${STEP[@]}" ${EXTRA[@]+"${EXTRA[@]}"}
}
sweep hfr,none
sweep hfr,none,hipi,hipi-q,random
# four more seeds of the pair the P(hfr > none) target compares
sweep hfr,none 5,6,7,8

# sparse-point-robot with the sparse reward for the critic too (hfr, none, hipi), and plain
# PEARL with the dense critic as the reference (20-24 min per run two at a time)
sparse() {  # sparse SEEDS ARGS...
    local seeds=$1; shift
    time metarelabel sweep --families sparse-point-robot --seeds "$seeds" --preset cpu \
        --workers "$WORKERS" --backend "$BACKEND" "${STEP[@]}" ${EXTRA[@]+"${EXTRA[@]}"} "$@"
}
sparse 0,1,2,3,4 --relabel hfr,none,hipi --set rl_reward=true --root "$ROOT-sparse-critic"
# sixteen more seeds of the pair the P(hfr > none) target compares
sparse 5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20 --relabel hfr,none --set rl_reward=true --root "$ROOT-sparse-critic"
sparse 0,1,2,3,4 --relabel none --root "$ROOT-dense-critic"

# keep the small per-seed files of finished runs (not the checkpoints)
bash "$(dirname "$0")/keep_runs.sh" "$ROOT" "$OUT/runs"
bash "$(dirname "$0")/keep_runs.sh" "$ROOT-sparse-critic" "$OUT/runs/sparse-critic"
bash "$(dirname "$0")/keep_runs.sh" "$ROOT-dense-critic" "$OUT/runs/dense-critic"

time metarelabel plot "$OUT/runs/four-corners" --out "$OUT" --final-iterations 10 --smooth 5
time metarelabel plot "$OUT/runs/sparse-critic" "$OUT/runs/dense-critic" --out "$OUT/sparse-point-robot" \
    --final-iterations 10 --smooth 5
# the sparse-critic target: hfr (sparse critic) against PEARL with the dense critic
python "$(dirname "$0")/versus.py" "$OUT/runs/sparse-critic/sparse-point-robot/hfr" "$OUT/runs/dense-critic/sparse-point-robot/none"
metarelabel didactic "$ROOT/four-corners/hfr/s0" --out "$OUT/didactic.png"

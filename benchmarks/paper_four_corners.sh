#!/usr/bin/env bash
# The paper's Four-Corners comparison with the `paper` preset (3x300 networks, 300 iterations of
# 1000 gradient steps): none / random / hipi / hfr x seeds 0,1,2, then the figures.  Meant for a
# machine with a GPU; on this project's 2-core CPU machine one run takes about 14 h
# (163 s per iteration), so docs/results.md uses benchmarks/results.sh (the `cpu` preset) instead.
#
#   bash benchmarks/paper_four_corners.sh                  # DEVICE=cuda WORKERS=4 by default
#   BACKEND=ray RAY_ADDRESS=host:6379 GPUS_PER_RUN=0.25 bash benchmarks/paper_four_corners.sh
#     (Ray hides GPUs from runs that reserve none: GPUS_PER_RUN is needed for DEVICE=cuda)
set -euo pipefail
ROOT=${ROOT:-runs/paper}
OUT=${OUT:-docs/results/paper}
WORKERS=${WORKERS:-4}
DEVICE=${DEVICE:-cuda}
BACKEND=${BACKEND:-local}
EXTRA=()
[[ -n "${RAY_ADDRESS:-}" ]] && EXTRA=(--ray-address "$RAY_ADDRESS")
[[ -n "${GPUS_PER_RUN:-}" ]] && EXTRA+=(--gpus-per-run "$GPUS_PER_RUN")

time metarelabel sweep --families four-corners --relabel none,random,hipi,hfr --seeds 0,1,2 \
    --preset paper --set device="$DEVICE" --root "$ROOT" --workers "$WORKERS" --backend "$BACKEND" ${EXTRA[@]+"${EXTRA[@]}"}
time metarelabel plot "$ROOT" --out "$OUT" --final-iterations 10 --smooth 5
metarelabel didactic "$ROOT/four-corners/hfr/s0" --out "$OUT/didactic.png"

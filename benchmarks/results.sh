#!/usr/bin/env bash
# Reproduces docs/results.md: none / random / hipi / hfr x seeds 0,1,2 on four-corners and
# sparse-point-robot with the `cpu` preset (about 10 min per run on one core), then the figures.
#
#   bash benchmarks/results.sh            # 24 runs, 2 at a time: about 1 h 45 min on 2 cores
#   WORKERS=8 bash benchmarks/results.sh  # on a bigger machine
#   BACKEND=ray RAY_ADDRESS=host:6379 bash benchmarks/results.sh   # on a Ray cluster
#
# The sweep is resumable: run the script again after an interruption and finished runs are
# skipped, interrupted ones resume from their last checkpoint.
set -euo pipefail
ROOT=${ROOT:-runs/cpu}
OUT=${OUT:-docs/results}
WORKERS=${WORKERS:-2}
BACKEND=${BACKEND:-local}
EXTRA=()
[[ -n "${RAY_ADDRESS:-}" ]] && EXTRA=(--ray-address "$RAY_ADDRESS")
[[ -n "${GPUS_PER_RUN:-}" ]] && EXTRA+=(--gpus-per-run "$GPUS_PER_RUN")

time metarelabel sweep --families four-corners,sparse-point-robot --relabel none,random,hipi,hfr \
    --seeds 0,1,2 --preset cpu --root "$ROOT" --workers "$WORKERS" --backend "$BACKEND" ${EXTRA[@]+"${EXTRA[@]}"}

# keep the small per-seed files the figures come from (not the checkpoints)
rm -rf "$OUT/runs"
find "$ROOT" -name progress.csv -printf '%h\n' | sort | while IFS= read -r d; do
    dest="$OUT/runs/${d#"$ROOT"/}"
    mkdir -p "$dest"
    cp "$d/progress.csv" "$d/config.json" "$d/run.json" "$dest/"
    # the relabeling matrix too where it is small (4 tasks: ~15 kB; 80 tasks: megabytes)
    find "$d" -maxdepth 1 -name relabel_matrix.csv -size -100k -exec cp {} "$dest/" \;
done

time metarelabel plot "$OUT/runs" --out "$OUT" --final-iterations 10 --smooth 5
metarelabel didactic "$ROOT/four-corners/hfr/s0" --out "$OUT/didactic.png"

#!/usr/bin/env bash
# Copy the small files of every *finished* run under a sweep root (progress.csv, config.json,
# run.json, and relabel_matrix.csv where it is under 100 kB) to DEST, keeping the
# family/strategy/seed layout; unfinished runs are left out, nothing under DEST is deleted.
#
#   bash benchmarks/keep_runs.sh SWEEP_ROOT DEST     # e.g. runs/cpu docs/results/runs
set -euo pipefail
if [[ $# -ne 2 ]]; then
    echo "usage: keep_runs.sh SWEEP_ROOT DEST" >&2
    exit 2
fi
ROOT=${1%/}
DEST=${2%/}
if [[ ! -d "$ROOT" ]]; then
    echo "keep_runs: error: no such sweep root: $ROOT" >&2
    exit 2
fi
n=0
while IFS= read -r d; do
    grep -q '"finished": "' "$d/run.json" 2>/dev/null || continue
    dest="$DEST/${d#"$ROOT"/}"
    mkdir -p "$dest"
    cp "$d/progress.csv" "$d/config.json" "$d/run.json" "$dest/"
    find "$d" -maxdepth 1 -name relabel_matrix.csv -size -100k -exec cp {} "$dest/" \;
    n=$((n + 1))
done < <(find "$ROOT" -name progress.csv -printf '%h\n' | sort)
echo "keep_runs: $n finished run(s) copied to $DEST"

#!/usr/bin/env bash
# The linear datamodeling score (LDS) on the synthetic world (configs/synthetic.py default) on one GPU.
#
#   bash benchmarks/lds_gpu.sh [WORKDIR]          # default /tmp/ts_lds_synth
#
# Trains the full-data model, fits the Hessians and encodes the corpus for every ladder variant (the
# pipeline's stages, skipped when up to date), then M = LDS_MODELS (64) models on random 50% subsets,
# LDS_MODELS_PER_STEP (64) at a time under one jit(vmap(step)), each with the main run's recipe
# (700 steps x 64 sentences), and prints the LDS table of every method and the wall time.
# LDS_CONFIG=configs/synthetic.py:runlocal=True LDS_MODELS=8 LDS_MODELS_PER_STEP=4: a CPU smoke run.
# Results: WORKDIR/lds.{json,md} (+ lds_models.npz: subsets, seeds, losses; lds_per_query.npz).
set -euo pipefail
wd=${1:-/tmp/ts_lds_synth}
models=${LDS_MODELS:-64}
per_step=${LDS_MODELS_PER_STEP:-64}
cfg=${LDS_CONFIG:-configs/synthetic.py}
mkdir -p "$wd"
t0=$SECONDS
rm -f "$wd/lds.json"
python -m launch.lds --config="$cfg" --workdir="$wd" \
  --config.lds.num_models="$models" --config.lds.models_per_step="$per_step" > "$wd/lds_log.txt" 2>&1 \
  || { tail -n 60 "$wd/lds_log.txt"; echo "[lds_gpu] failed: log in $wd/lds_log.txt" >&2; exit 1; }
grep -E "pipeline \[|lds: (models|.*LDS)" "$wd/lds_log.txt" | sed 's/^.*\] //'
cat "$wd/lds.md"
echo "[lds_gpu] M=$models models ($per_step per step): wall $((SECONDS - t0)) s"

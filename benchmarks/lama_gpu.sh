#!/usr/bin/env bash
# The LAMA T-REx benchmark on one GPU, stage by stage (README "Results" quotes its output).
#
#   bash benchmarks/lama_gpu.sh bench     WORKDIR   # encoder vs training-step throughput/memory
#   bash benchmarks/lama_gpu.sh train     WORKDIR   # small LM on all 20 relations
#   bash benchmarks/lama_gpu.sh attribute WORKDIR   # fit_hessian -> encode -> retrieve
#   bash benchmarks/lama_gpu.sh evaluate  WORKDIR   # the full ablation table (launch.pipeline; trains if needed)
#   bash benchmarks/lama_gpu.sh correction WORKDIR  # TrackStar with exact Adam vs its rank-1 fit only (trains if
#                                                   # needed): ablation.md's paired comparison on the relation split
#
# Text baselines need no GPU: precompute them anywhere with
#   python -m launch.pipeline --config=configs/lama.py:model=small --workdir=W --stages=retrieve --methods=dense
# and copy W/ladder/results/ into WORKDIR/ladder/results/ (reused, not recomputed).
#
# LAMA_DIR points at the lama_trex folder (default ../shared/data/lama_trex);
# RESULTS_DIR receives the small result files (default WORKDIR).
set -euo pipefail
stage=$1
wd=$2
data=${LAMA_DIR:-../shared/data/lama_trex}
out=${RESULTS_DIR:-$wd}
cfg="configs/lama.py:model=small"
export TFDS_DATA_DIR=${TFDS_DATA_DIR:-$wd/tfds}
mkdir -p "$wd" "$out"
timed() { local t0=$SECONDS; "$@"; echo "[lama_gpu] $* took $((SECONDS - t0)) s"; }
case $stage in
  bench)
    timed python benchmarks/bench_encoder.py --mode=all --dtype=bfloat16 | tee "$out/bench_encoder.txt"
    timed python benchmarks/bench_retrieval.py | tee "$out/bench_retrieval.txt" ;;
  train)
    timed python -m launch.train --config=$cfg --config.manual_dir="$data" --workdir="$wd"
    cp "$wd/metrics.jsonl" "$out/train_metrics.jsonl" ;;
  attribute)
    for job in fit_hessian encode retrieve; do
      timed python -m launch.$job --config=$cfg --config.manual_dir="$data" --workdir="$wd"
    done
    du -sh "$wd"/encodings.zarr | tee "$out/store_size.txt"
    cp "$wd/results.jsonl" "$out/" ;;
  evaluate)  # trains too, unless WORKDIR holds the finished checkpoint
    timed python -m launch.pipeline --config=$cfg --config.manual_dir="$data" --workdir="$wd"
    cp "$wd"/ablation.md "$wd"/ablation.json "$out/"
    [ -f "$wd/metrics.jsonl" ] && cp "$wd/metrics.jsonl" "$out/train_metrics.jsonl"
    du -sh "$wd"/ladder/*/encodings.zarr | tee "$out/store_size.txt"
    gzip -c "$wd/ladder/results/r_mixed_trackstar.jsonl" > "$out/trackstar_results.jsonl.gz" || true ;;
  correction)
    timed python -m launch.pipeline --config=$cfg --config.manual_dir="$data" --workdir="$wd" \
      --config.encoder.correction=adam --methods="+ R_mixed = TrackStar" --methods="TrackStar, Adam rank-1"
    cp "$wd"/ablation.md "$wd"/ablation.json "$out/"
    [ -f "$wd/metrics.jsonl" ] && cp "$wd/metrics.jsonl" "$out/train_metrics.jsonl"
    cp "$wd"/pipeline_metrics.jsonl "$out/" 2>/dev/null || true ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac

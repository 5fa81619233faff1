#!/usr/bin/env bash
# The GPU figures issue 14 asked for, in one unattended run on one H200 (rerun them after a change).
#
#   setsid nohup bash benchmarks/owed_gpu.sh OUT_DIR > OUT_DIR.log 2>&1 &   # then poll OUT_DIR/DONE
#
# Each case is its own process under its own time cap (a case that overruns is reported as such and
# the next one starts), longest-owed first, so a 30-minute lease gets as many figures as fit:
#   1. bench_perf --sections=encode: the encode job's rows/s vs the kernel and a training step (LAMA shape)
#   2. bench_encoder at the 1B shape: exact Adam vs the training step (target >= 0.95x)
#   3. bench_encoder, Gemma3_1B's shape: the training step, then adam_rank1 and exact Adam, each alone
#   4. bench_compact: bf16 / int8 / int4 store size, write time and scan rows/s at d = 2^16
# All four were measured on 2026-12-02 (BENCHMARKS.md; case 3 in the fourth session's run B7).
# Needs the wheels of benchmarks/README.md on PYTHONPATH; the Gemma case also the light gemma site
# (GEMMA_SITE, default .gemma_site: pip install --no-deps --target .gemma_site -r
# benchmarks/no_tensorflow/gemma-requirements.txt). OWED_CASES=1,3 runs a subset.
set -uo pipefail
out=${1:?usage: bash benchmarks/owed_gpu.sh OUT_DIR}
cases=",${OWED_CASES:-1,2,3,4},"
gemma_site=${GEMMA_SITE:-.gemma_site}
mkdir -p "$out"
rm -f "$out/DONE"

run_case() { # name cap_s command...
  local name=$1 cap=$2
  shift 2
  local t0=$SECONDS rc=0
  echo "[owed] $name: start (cap ${cap} s): $*"
  timeout --signal=KILL "$cap" "$@" > "$out/$name.log" 2>&1 || rc=$?
  if [[ $rc -eq 137 ]]; then
    echo "[owed] $name: did not finish within ${cap} s (log: $out/$name.log)"
  else
    echo "[owed] $name: rc=$rc after $((SECONDS - t0)) s (log: $out/$name.log)"
  fi
  tail -n 25 "$out/$name.log"
}

if [[ $cases == *,1,* ]]; then
  run_case encode_job 420 python benchmarks/bench_perf.py --sections=encode --dir="$out/stores"
  rm -rf "$out/stores"
fi
if [[ $cases == *,2,* ]]; then
  run_case adam_1b 420 python benchmarks/bench_encoder.py --mode=all --modes=train,adam --model=paper_1b \
    --dtype=bfloat16 --batch=16 --seq=512
fi
if [[ $cases == *,3,* ]]; then
  for mode in train adam_rank1 adam; do
    PYTHONPATH="benchmarks/no_tensorflow:$gemma_site:${PYTHONPATH:-}" run_case "gemma1b_$mode" 420 \
      python benchmarks/bench_encoder.py --mode="$mode" --arch=gemma3 --model=gemma3_1b --vocab=262144 \
      --batch=16 --seq=256
  done
fi
if [[ $cases == *,4,* ]]; then
  run_case compact 420 python benchmarks/bench_compact.py --dir="$out/compact"
  rm -rf "$out/compact"
fi
echo "[owed] done" | tee "$out/DONE"

#!/usr/bin/env bash
# LAMA mixed-training variants, trained side by side on one GPU and chosen on a fixed split of relations.
#
#   bash benchmarks/lama_mixed_sweep.sh ROOT                      # the default variants below
#   bash benchmarks/lama_mixed_sweep.sh ROOT 'NAME=LAUNCH ARGS' ...
#
# Each variant is `launch.train` into ROOT/NAME, then `launch.accuracy` (greedy accuracy on the held-out
# facts, split into dev / test relations by `evaluation.relation_split`, seed config.accuracy.split_seed);
# the last step prints the variants' table with the one selected on the dev relations' >= 3-sentence
# accuracy marked. Report its test columns: the test relations played no part in the choice.
# Variants share the GPU (XLA_PYTHON_CLIENT_MEM_FRACTION each) and the TFDS builds (built once, under a lock).
# LAMA_DIR: the lama_trex folder (default ../shared/data/lama_trex).
set -euo pipefail
root=$1
shift
data=${LAMA_DIR:-../shared/data/lama_trex}
export TFDS_DATA_DIR=${TFDS_DATA_DIR:-$root/tfds}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.25}
mixed="--config.lama_mixed.paraphrases=2 --config.train.num_steps=2000 --config.train.eval_every=0"
if [ $# -eq 0 ]; then
  set -- \
    "small_p2=--config=configs/lama.py:model=small,mixed=True $mixed" \
    "154m_p2=--config=configs/lama.py:model=paper_154m,mixed=True $mixed" \
    "154m_p2_lr5e-4=--config=configs/lama.py:model=paper_154m,mixed=True $mixed --config.train.learning_rate=5e-4"
fi
mkdir -p "$root"
names=()
pids=()
for v in "$@"; do
  name=${v%%=*}
  args=${v#*=}
  names+=("$name")
  # shellcheck disable=SC2086  # $args is a list of flags
  (
    t0=$SECONDS
    python -m launch.train $args --config.manual_dir="$data" --workdir="$root/$name"
    python -m launch.accuracy $args --config.manual_dir="$data" --workdir="$root/$name"
    echo "[sweep] $name took $((SECONDS - t0)) s"
  ) >"$root/$name.log" 2>&1 &
  pids+=($!)
done
status=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    echo "[sweep] variant ${names[$i]} failed: tail of $root/${names[$i]}.log" >&2
    tail -20 "$root/${names[$i]}.log" >&2
    status=1
  fi
done
compare=()
for i in "${!names[@]}"; do
  [ -f "$root/${names[$i]}/accuracy.json" ] && compare+=("--compare=${names[$i]}=$root/${names[$i]}")
done
first=${1#*=}
# shellcheck disable=SC2086
[ ${#compare[@]} -gt 0 ] && python -m launch.accuracy ${first%% *} --workdir="$root" "${compare[@]}" | tee "$root/sweep.md"
exit "$status"

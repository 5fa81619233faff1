#!/usr/bin/env bash
# Runs one trackstar_jax launcher (launch/<job>.py) on every worker of a Cloud TPU VM pod slice.
#
#   TPU=my-v5p-256 ZONE=us-east5-a launch/tpu_pod.sh install
#   TPU=my-v5p-256 ZONE=us-east5-a launch/tpu_pod.sh encode --config=configs/lama.py --workdir=gs://bucket/ts_lama
#
# Environment: TPU (the TPU VM name), ZONE; optional PROJECT (default: gcloud's configured project),
# REMOTE_DIR (checkout on the workers, default trackstar_jax in the login user's home), PYTHON (python3),
# EXTRAS (pip extras, default data,eval,tpu), GCLOUD (gcloud).
# Needs the gcloud CLI, authenticated for the project (`gcloud auth login`), and git (for `install`).
#
#   install   copies this checkout's HEAD (git archive) to every worker and pip-installs it with jax[tpu];
#             run it again after a new commit.
#   <job>     train | encode | fit_hessian | retrieve | evaluate | pipeline: the same command on all
#             workers (`--worker=all`), with --distributed: jax.distributed.initialize() finds the
#             other workers from the TPU metadata. --workdir must be shared by the workers: gs://...
#             (every job's outputs take gs:// URLs) or a mounted file system.
set -euo pipefail

: "${TPU:?set TPU to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU zone, e.g. us-east5-a}"
GCLOUD="${GCLOUD:-gcloud}"
PYTHON="${PYTHON:-python3}"
REMOTE_DIR="${REMOTE_DIR:-trackstar_jax}"
EXTRAS="${EXTRAS:-data,eval,tpu}"
project_flag=()
if [[ -n "${PROJECT:-}" ]]; then
  project_flag=(--project="$PROJECT")
fi

on_all_workers() { # one shell command line, run on every worker; fails if any worker fails
  "$GCLOUD" compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" "${project_flag[@]}" --worker=all --command="$1"
}

if [[ $# -lt 1 ]]; then
  echo "usage: TPU=... ZONE=... launch/tpu_pod.sh install | <train|encode|fit_hessian|retrieve|evaluate|pipeline> [flags...]" >&2
  exit 2
fi
job="$1"
shift
remote_dir_q="$(printf '%q' "$REMOTE_DIR")"

case "$job" in
  install)
    repo="$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)"
    archive="$(mktemp -t trackstar_jax.XXXXXX.tar.gz)"
    trap 'rm -f "$archive"' EXIT
    git -C "$repo" archive --format=tar.gz -o "$archive" HEAD
    "$GCLOUD" compute tpus tpu-vm scp "$archive" "$TPU:trackstar_jax.tar.gz" --zone="$ZONE" "${project_flag[@]}" --worker=all
    on_all_workers "set -e; rm -rf $remote_dir_q; mkdir -p $remote_dir_q; tar -xzf trackstar_jax.tar.gz -C $remote_dir_q; \
$(printf '%q' "$PYTHON") -m pip install -q -e $remote_dir_q'[$EXTRAS]'"
    ;;
  train | encode | fit_hessian | retrieve | evaluate | pipeline)
    args=""
    if [[ $# -gt 0 ]]; then
      args="$(printf ' %q' "$@")"
    fi
    on_all_workers "cd $remote_dir_q && PYTHONUNBUFFERED=1 $(printf '%q' "$PYTHON") -m launch.$job --distributed${args}"
    ;;
  *)
    echo "unknown job '$job': expected install, train, encode, fit_hessian, retrieve, evaluate or pipeline" >&2
    exit 2
    ;;
esac

#!/usr/bin/env bash
# Copy this checkout to every worker of a TPU VM and install it there (with libtpu: the "tpu" extra).
# Rerun it after changing the code; it replaces ~/mllm_jax on every worker. Workdirs, data and model
# directories can then be gs:// paths directly (no mount needed; see docs/tpu.md).
#
#   tpu/setup.sh [--dry-run] NAME ZONE
#
#   --dry-run   print the commands instead of running them

set -euo pipefail
# shellcheck source=tpu/common.sh
source "$(dirname "$0")/common.sh"

ARGS=()
for arg in "$@"; do
  case "$arg" in
    --mount=*) die "--mount is gone: pass gs://BUCKET/... paths to tpu/launch.sh directly (docs/tpu.md)" ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage && exit 0 ;;
    -*) die "unknown flag $arg (see --help)" ;;
    *) ARGS+=("$arg") ;;
  esac
done
expect 2 "${ARGS[@]}"
NAME=${ARGS[0]} ZONE=${ARGS[1]}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TARBALL=${TMPDIR:-/tmp}/mllm_jax-$NAME.tgz

# the code only: no git history, build leftovers or local runs
run tar -czf "$TARBALL" -C "$ROOT" --exclude=.git --exclude='*.egg-info' --exclude=__pycache__ \
  --exclude=.pytest_cache --exclude=logs .
run gcloud compute tpus tpu-vm scp "$TARBALL" "$NAME":mllm_jax.tgz --zone="$ZONE" --worker=all
install="rm -rf mllm_jax && mkdir mllm_jax && tar -xzf mllm_jax.tgz -C mllm_jax && cd mllm_jax"
install+=" && python3 -m pip install --quiet --upgrade pip && python3 -m pip install --quiet -e '.[tpu]'"
install+=" && python3 -c 'import sys, jax; print(jax.process_index(), jax.devices()[0].device_kind,"
install+=" \"python\", sys.version.split()[0], \"jax\", jax.__version__)'"
run gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --worker=all --command="$install"


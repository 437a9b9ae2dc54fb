#!/usr/bin/env bash
# Copy this checkout to every worker of a TPU VM and install it there, in its own Python: uv (from
# PyPI) installs Python 3.11 and a virtual environment ~/mllm_jax_env (TPU VM images ship Python 3.10,
# which current jax does not support), then the checkout with libtpu (the "tpu" extra). Rerun it after
# changing the code: it refuses, and replaces nothing, on a worker where an mllm_jax job is running
# (tpu/stop.sh first). Workdirs, data and model directories can be gs:// paths directly (docs/tpu.md).
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
# unpacked beside the old tree, then swapped in: the old code is only removed when no job runs from it
install="set -e; if pgrep -f '$JOB_PATTERN' > /dev/null; then"
install+=" echo \"error: \$(hostname): an mllm_jax job is running; stop it first (tpu/stop.sh)\" >&2; exit 1; fi"
install+="; python3 -m pip install --quiet --user --upgrade uv"
install+=" && ~/.local/bin/uv venv --quiet --allow-existing --python $PYTHON_VERSION $ENV_DIR"
install+=" && rm -rf mllm_jax.new && mkdir mllm_jax.new && tar -xzf mllm_jax.tgz -C mllm_jax.new"
install+=" && rm -rf mllm_jax.old && { [ ! -e mllm_jax ] || mv mllm_jax mllm_jax.old; } && mv mllm_jax.new mllm_jax"
install+=" && ~/.local/bin/uv pip install --quiet --python $ENV_DIR/bin/python -e './mllm_jax[tpu]'"
install+=" && $ENV_DIR/bin/python -c 'import sys, jax; print(jax.process_index(), jax.devices()[0].device_kind,"
install+=" \"python\", sys.version.split()[0], \"jax\", jax.__version__)'"
run gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --worker=all --command="$install"

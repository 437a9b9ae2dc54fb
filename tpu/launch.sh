#!/usr/bin/env bash
# Run one training command on every worker of a TPU VM at once (--distributed=on: JAX finds the
# slice's hosts by itself and joins them into one cluster). Each worker's output goes to
# LOGS/<worker>.log on this machine. Rerunning the same command resumes from the newest checkpoint in
# WORKDIR, e.g. after a preemption.
#
#   tpu/launch.sh [--logs=DIR] [--dry-run] NAME ZONE CONFIG WORKDIR [-- MAIN_FLAGS...]
#
#   CONFIG       e.g. configs/llava.py:7b (a path inside the checkout)
#   WORKDIR      gs://BUCKET/run: checkpoints and metrics, shared by all workers
#   MAIN_FLAGS   more flags for python -m mllm_jax.main, e.g. --config.model.init.llm=gs://BUCKET/vicuna
#                or --distributed_timeout=600 (seconds for every worker to join; default 300)
#   --logs=DIR   where the logs go (default: logs/NAME-<date>-<time>)
#   --dry-run    print the commands instead of running them

set -euo pipefail
# shellcheck source=tpu/common.sh
source "$(dirname "$0")/common.sh"

LOGS=""
ARGS=()
MAIN_FLAGS=()
while (($#)); do
  case "$1" in
    --) shift && MAIN_FLAGS=("$@") && break ;;
    --logs=*) LOGS=${1#--logs=} ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage && exit 0 ;;
    -*) die "unknown flag $1 (see --help; flags for mllm_jax.main go after --)" ;;
    *) ARGS+=("$1") ;;
  esac
  shift
done
expect 4 "${ARGS[@]}"
NAME=${ARGS[0]} ZONE=${ARGS[1]} CONFIG=${ARGS[2]} WORKDIR=${ARGS[3]}
LOGS=${LOGS:-logs/$NAME-$(date +%Y%m%d-%H%M%S)}
if [[ $WORKDIR != gs://* ]]; then
  # each host would write its shards of every checkpoint to its own disk, lost with the VM
  echo "warning: WORKDIR $WORKDIR is not gs://: on a slice of several hosts they must all see it" >&2
fi

main=(python3 -m mllm_jax.main --config="$CONFIG" --workdir="$WORKDIR" --distributed=on)
main+=("${MAIN_FLAGS[@]}")
remote=$(printf '%q ' "${main[@]}")
run mkdir -p "$LOGS"
# exec: the job is the ssh session's only process, so tpu/stop.sh's SIGTERM reaches it alone
run gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --worker=all --output-directory="$LOGS" \
  --command="cd mllm_jax && exec ${remote% }"

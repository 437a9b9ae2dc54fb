#!/usr/bin/env bash
# Stop the training job on every worker: SIGTERM makes every process save the same step and exit
# (code 143); this waits until they have. tpu/launch.sh with the same WORKDIR resumes it.
#
#   tpu/stop.sh [--vm] [--dry-run] NAME ZONE
#
#   --vm        also stop the VM itself (single-host TPU VMs only: a pod slice can only be deleted)
#   --dry-run   print the commands instead of running them

set -euo pipefail
# shellcheck source=tpu/common.sh
source "$(dirname "$0")/common.sh"

VM=0
ARGS=()
for arg in "$@"; do
  case "$arg" in
    --vm) VM=1 ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage && exit 0 ;;
    -*) die "unknown flag $arg (see --help)" ;;
    *) ARGS+=("$arg") ;;
  esac
done
expect 2 "${ARGS[@]}"
NAME=${ARGS[0]} ZONE=${ARGS[1]}

job="${JOB_PATTERN}main"
stop="pkill -TERM -f '$job' || true; for _ in \$(seq 120); do pgrep -f '$job' > /dev/null || exit 0; sleep 5;"
stop+=" done; echo 'still running after 10 minutes' >&2; exit 1"
run gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --worker=all --command="$stop"
if ((VM)); then
  run gcloud compute tpus tpu-vm stop "$NAME" --zone="$ZONE"
fi

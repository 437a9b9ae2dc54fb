#!/usr/bin/env bash
# Show the log of the newest job tpu/launch.sh started on a worker of a TPU VM (process 0, on worker 0,
# logs the metrics); --follow keeps printing until Ctrl-C, which leaves the job running.
#
#   tpu/logs.sh [--worker=N] [--lines=N] [--follow] [--dry-run] NAME ZONE
#
#   --worker=N   the worker (default 0); "all" prints every worker's log, one after the other
#   --lines=N    how many lines from the end (default 100)
#   --follow     keep printing new lines (tail -F)
#   --dry-run    print the command instead of running it

set -euo pipefail
# shellcheck source=tpu/common.sh
source "$(dirname "$0")/common.sh"

WORKER=0
LINES=100
FOLLOW=""
ARGS=()
for arg in "$@"; do
  case "$arg" in
    --worker=*) WORKER=${arg#--worker=} ;;
    --lines=*) LINES=${arg#--lines=} ;;
    --follow) FOLLOW=" -F" ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage && exit 0 ;;
    -*) die "unknown flag $arg (see --help)" ;;
    *) ARGS+=("$arg") ;;
  esac
done
expect 2 "${ARGS[@]}"
NAME=${ARGS[0]} ZONE=${ARGS[1]}
[[ $LINES =~ ^[0-9]+$ ]] || die "--lines=$LINES: expected a number"
[[ $WORKER =~ ^([0-9]+|all)$ ]] || die "--worker=$WORKER: expected a worker number or all"
if [[ $WORKER == all && -n $FOLLOW ]]; then die "--follow takes one worker"; fi
run gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --worker="$WORKER" \
  --command="echo \"== \$(hostname)\"; tail -n $LINES$FOLLOW $LOG_DIR/latest.log"

#!/usr/bin/env bash
# Delete a TPU VM, or a queued resource together with its TPU. Checkpoints in gs:// are kept.
#
#   tpu/delete.sh [--queued] [--yes] [--dry-run] NAME ZONE
#
#   --queued    NAME is a queued resource (made by tpu/create.sh --queued)
#   --yes       do not ask for confirmation
#   --dry-run   print the gcloud command instead of running it

set -euo pipefail
# shellcheck source=tpu/common.sh
source "$(dirname "$0")/common.sh"

QUEUED=0
YES=0
ARGS=()
for arg in "$@"; do
  case "$arg" in
    --queued) QUEUED=1 ;;
    --yes) YES=1 ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage && exit 0 ;;
    -*) die "unknown flag $arg (see --help)" ;;
    *) ARGS+=("$arg") ;;
  esac
done
expect 2 "${ARGS[@]}"
NAME=${ARGS[0]} ZONE=${ARGS[1]}

extra=()
if ((YES)); then extra+=(--quiet); fi
if ((QUEUED)); then
  run gcloud compute tpus queued-resources delete "$NAME" --zone="$ZONE" --force "${extra[@]}"
else
  run gcloud compute tpus tpu-vm delete "$NAME" --zone="$ZONE" "${extra[@]}"
fi

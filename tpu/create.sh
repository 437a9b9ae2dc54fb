#!/usr/bin/env bash
# Create a TPU VM (one host or a pod slice), directly or as a queued resource.
#
#   tpu/create.sh [--queued] [--spot] [--service-account=EMAIL] [--dry-run] NAME ZONE ACCELERATOR_TYPE
#                 [RUNTIME_VERSION]
#
#   NAME               the TPU's name, e.g. llava-7b
#   ZONE               e.g. us-central2-b (v4), us-west4-a (v5e), us-east5-a (v5p), us-east1-d (v6e)
#   ACCELERATOR_TYPE   e.g. v4-32, v5e-16, v5p-8, v6e-8 (as python -m mllm_jax.plan --target names
#                      them; v5e-N is GCE's v5litepod-N, which is accepted too)
#   RUNTIME_VERSION    the VM image; default: the one for the accelerator's generation
#   --queued           ask through a queued resource: waits for capacity instead of failing
#   --spot             spot capacity: cheaper, can be preempted (rerun tpu/launch.sh to resume)
#   --service-account=EMAIL   the VMs' service account (default: the Compute Engine default one);
#                      it needs read and write access to the run's bucket (docs/tpu.md, step 1)
#   --dry-run          print the gcloud command instead of running it
#
# The VMs get the cloud-platform scope, so the service account's IAM roles alone decide what they
# may access.

set -euo pipefail
# shellcheck source=tpu/common.sh
source "$(dirname "$0")/common.sh"

QUEUED=0
SPOT=0
ACCOUNT=""
ARGS=()
for arg in "$@"; do
  case "$arg" in
    --queued) QUEUED=1 ;;
    --spot) SPOT=1 ;;
    --service-account=*) ACCOUNT=${arg#--service-account=} ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage && exit 0 ;;
    -*) die "unknown flag $arg (see --help)" ;;
    *) ARGS+=("$arg") ;;
  esac
done
if ((${#ARGS[@]} == 3)); then
  ARGS+=("$(default_runtime "${ARGS[2]}")")
fi
expect 4 "${ARGS[@]}"
NAME=${ARGS[0]} ZONE=${ARGS[1]} TYPE=$(accelerator_type "${ARGS[2]}") RUNTIME=${ARGS[3]}

extra=(--scopes=https://www.googleapis.com/auth/cloud-platform)
if [[ -n $ACCOUNT ]]; then extra+=(--service-account="$ACCOUNT"); fi
if ((SPOT)); then extra+=(--spot); fi
if ((QUEUED)); then
  run gcloud compute tpus queued-resources create "$NAME" --zone="$ZONE" --node-id="$NAME" \
    --accelerator-type="$TYPE" --runtime-version="$RUNTIME" "${extra[@]}"
  echo "queued; it is ready when this says ACTIVE:" >&2
  echo "  gcloud compute tpus queued-resources describe $NAME --zone=$ZONE --format='value(state.state)'" >&2
else
  run gcloud compute tpus tpu-vm create "$NAME" --zone="$ZONE" \
    --accelerator-type="$TYPE" --version="$RUNTIME" "${extra[@]}"
fi

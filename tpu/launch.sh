#!/usr/bin/env bash
# Start one training command on every worker of a TPU VM at once (--distributed=on: JAX finds the
# slice's hosts by itself and joins them into one cluster). The job runs detached on each worker
# (setsid nohup), so it survives this ssh session; its output goes to the worker's
# ~/mllm_jax_logs/RUN.log (and latest.log): follow it with tpu/logs.sh. XLA_FLAGS and
# LIBTPU_INIT_ARGS set here are passed to the job. Rerunning the same command resumes from the newest
# checkpoint in WORKDIR, e.g. after a preemption; a worker where a job already runs refuses.
#
#   tpu/launch.sh [--dry-run] NAME ZONE CONFIG WORKDIR [-- MAIN_FLAGS...]
#
#   CONFIG       e.g. configs/llava.py:7b (a path inside the checkout)
#   WORKDIR      gs://BUCKET/run: checkpoints and metrics, shared by all workers
#   MAIN_FLAGS   more flags for python -m mllm_jax.main, e.g. --config.model.init.llm=gs://BUCKET/vicuna
#                or --distributed_timeout=600 (seconds for every worker to join; default 300)
#   --dry-run    print the command instead of running it

set -euo pipefail
# shellcheck source=tpu/common.sh
source "$(dirname "$0")/common.sh"

ARGS=()
MAIN_FLAGS=()
while (($#)); do
  case "$1" in
    --) shift && MAIN_FLAGS=("$@") && break ;;
    --logs=*) die "--logs is gone: the logs stay on the workers (~/$LOG_DIR); read them with tpu/logs.sh" ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage && exit 0 ;;
    -*) die "unknown flag $1 (see --help; flags for mllm_jax.main go after --)" ;;
    *) ARGS+=("$1") ;;
  esac
  shift
done
expect 4 "${ARGS[@]}"
NAME=${ARGS[0]} ZONE=${ARGS[1]} CONFIG=${ARGS[2]} WORKDIR=${ARGS[3]}
if [[ $WORKDIR != gs://* ]]; then
  # each host would write its shards of every checkpoint to its own disk, lost with the VM
  echo "warning: WORKDIR $WORKDIR is not gs://: on a slice of several hosts they must all see it" >&2
fi

# env VAR=... for the XLA / libtpu settings of this shell, then the job's own command
main=(env)
for var in XLA_FLAGS LIBTPU_INIT_ARGS; do
  if [[ -n ${!var:-} ]]; then main+=("$var=${!var}"); fi
done
main+=("../$ENV_DIR/bin/python" -m)
flags=(--config="$CONFIG" --workdir="$WORKDIR" --distributed=on "${MAIN_FLAGS[@]}")
log=$NAME-$(date +%Y%m%d-%H%M%S).log
# the module through a variable: this shell's own text must not match JOB_PATTERN, the job's must
remote="M=mllm_jax.main; if pgrep -f '$JOB_PATTERN' > /dev/null; then"
remote+=" echo \"error: \$(hostname): an mllm_jax job is running already (tpu/stop.sh stops it)\" >&2; exit 1; fi"
remote+="; mkdir -p $LOG_DIR && ln -sfn $log $LOG_DIR/latest.log && cd mllm_jax || exit 1"
# setsid + nohup, every stream redirected: the job outlives the ssh session that started it
remote+="; setsid nohup $(printf '%q ' "${main[@]}")\"\$M\" $(printf '%q ' "${flags[@]}")"
remote+="> ../$LOG_DIR/$log 2>&1 < /dev/null &"
remote+=" echo \"\$(hostname): started, log ~/$LOG_DIR/$log\""
run gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --worker=all --command="$remote"

# Sourced by the tpu/ scripts: usage text, errors and --dry-run.
# shellcheck shell=bash disable=SC2034  # its variables are the sourcing scripts'

DRY_RUN=0
# On the workers: the Python tpu/setup.sh installs (uv, from PyPI) and the environment it installs into
# (paths relative to the home directory, where gcloud's ssh starts), and the pattern that finds a job of
# ours (the brackets keep the shell that runs pgrep from matching itself).
PYTHON_VERSION=3.11
ENV_DIR=mllm_jax_env
JOB_PATTERN='python3? -m [m]llm_jax[.]'
LOG_DIR=mllm_jax_logs

# The calling script's header comment (its lines after the shebang, up to the first blank line).
usage() { sed -n '2,/^$/{s/^# \{0,1\}//;p;}' "$0"; }

die() {
  echo "error: $*" >&2
  exit 2
}

# expect N "$@": exactly N positional arguments, or the usage and exit code 2.
expect() {
  local n=$1
  shift
  if (($# != n)); then
    usage >&2
    exit 2
  fi
}

# One argument as the shell reads it back: as is when plain, else in single quotes.
quote() {
  local plain='^[A-Za-z0-9_./:=,@%+-]+$'
  if [[ $1 =~ $plain ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# run CMD...: run it, or with --dry-run only print it, quoted so that it can be pasted.
run() {
  if ((DRY_RUN)); then
    local arg line=""
    for arg in "$@"; do line+="${line:+ }$(quote "$arg")"; done
    echo "$line"
  else
    "$@"
  fi
}

# The GCE accelerator type of a slice as `python -m mllm_jax.plan --target` names it: v5e-N is v5litepod-N.
accelerator_type() {
  case "$1" in
    v5e-*) echo "v5litepod-${1#v5e-}" ;;
    *) echo "$1" ;;
  esac
}

# The runtime (VM image) for an accelerator type, from Google's TPU software versions page.
default_runtime() {
  case "$1" in
    v4-*) echo "tpu-ubuntu2204-base" ;;
    v5litepod-* | v5e-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    *) die "no default runtime version for accelerator type $1: pass one" ;;
  esac
}

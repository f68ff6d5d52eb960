# shellcheck shell=bash
# Sourced by launch/torchrun.sh and launch/deepspeed.sh: the repository root, the Python to use, the
# stop-signal handling (signals.sh), the small helpers both scripts' option handling needs, and the
# options, preflight arguments and dry-run lines the two scripts have in common.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# first: a stop signal from here on ends the script with 75 (see signals.sh)
# shellcheck source=launch/signals.sh
source "$ROOT/launch/signals.sh"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
# The repository's packages import from any working directory, installed or not.
case ":${PYTHONPATH:-}:" in *":$ROOT:"*) ;; *) export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" ;; esac  # once
export ROOT PYTHON
# The script that sourced this file: its header comment is its --help.
launch_script="${BASH_SOURCE[1]}"

die() { echo "launch/${0##*/}: error: $*" >&2; exit 2; }
need_value() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value"; }
# check_int WHAT VAR MIN MAX: the variable VAR holds an integer in [MIN, MAX], else the script stops
# naming WHAT; VAR is rewritten in base 10 ('08' -> 8): bash arithmetic reads a leading 0 as octal.
check_int() {
  local value="${!2}"
  if ! [[ "$value" =~ ^[0-9]+$ ]] || (( 10#$value < $3 || 10#$value > $4 )); then
    die "$1 must be an integer in [$3, $4], got '$value'"
  fi
  printf -v "$2" '%d' "$((10#$value))"
}
quote() { local out="" a; for a in "$@"; do out+="$(printf '%q' "$a") "; done; echo "${out% }"; }

# Defaults of the options both scripts take (shared_option parses them).
module="retnet_train.train"
checkpoint_dir=""
params=""
require_gpu=0
preflight=1
dry_run=0

# shared_option ARG...: reads one of the options both scripts take from the front of ARG...; sets
# `taken` to the number of arguments it used, 0 when $1 is not one of them.
# shellcheck disable=SC2034  # taken and dry_run are read by the script that sourced this file
shared_option() {
  taken=1
  case "$1" in
    --module) need_value "$@"; module="$2"; taken=2 ;;
    --checkpoint-dir) need_value "$@"; checkpoint_dir="$2"; taken=2 ;;
    --params) need_value "$@"; params="$2"; taken=2 ;;
    --require-gpu) require_gpu=1 ;;
    --no-preflight) preflight=0 ;;
    --dry-run) dry_run=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$launch_script" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
    *) taken=0 ;;
  esac
}

# add_preflight_options: appends the shared preflight options to the `check` command.
add_preflight_options() {
  if [[ -n "$checkpoint_dir" ]]; then check+=(--checkpoint-dir "$checkpoint_dir"); fi
  if [[ -n "$params" ]]; then check+=(--params "$params"); fi
  if [[ "$require_gpu" == 1 ]]; then check+=(--require-gpu); fi
}

# add_preflight_program_args: the preflight composes the trainer's Hydra config from the same
# overrides (checkpoint dir, model size, batch arithmetic for this world size, data paths); another
# --module has no config.
add_preflight_program_args() {
  if [[ "$module" == retnet_train.train ]]; then check+=(-- "${prog_args[@]}"); else check+=(--no-config); fi
}

# print_env_and_preflight: for --dry-run, the variables of this environment that the training
# processes act on (collectives, devices, allocators, compilers) as export lines (pasted into a new
# shell they reach the commands), then the preflight command.
print_env_and_preflight() {
  env | LC_ALL=C sort | grep -E '^(NCCL|RCCL|TORCH_NCCL|CUDA|HIP|ROCR|HSA|MIOPEN|PYTORCH|TRITON|FI|OMP)_[A-Z0-9_]*=|^PYTHON(PATH|UNBUFFERED)=' \
    | while IFS='=' read -r k v; do echo "export $k=$(printf '%q' "$v")"; done || true
  if [[ "$preflight" == 1 ]]; then echo "# preflight:"; quote "${check[@]}"; fi
}

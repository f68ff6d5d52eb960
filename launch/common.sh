# shellcheck shell=bash
# Sourced by launch/torchrun.sh and launch/deepspeed.sh: the repository root, the Python to use, and
# the small helpers both scripts' option handling needs.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
# The repository's packages import from any working directory, installed or not.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export ROOT PYTHON

die() { echo "launch/${0##*/}: error: $*" >&2; exit 2; }
need_value() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value"; }
check_int() {
  if ! [[ "$2" =~ ^[0-9]+$ ]] || (( 10#$2 < $3 || 10#$2 > $4 )); then
    die "$1 must be an integer in [$3, $4], got '$2'"
  fi
}
quote() { local out="" a; for a in "$@"; do out+="$(printf '%q' "$a") "; done; echo "${out% }"; }

# shellcheck shell=bash
# Sourced by launch/common.sh: what launch/torchrun.sh and launch/deepspeed.sh do with the stop signals,
# SIGTERM (preemption) and SIGUSR1 (sbatch --signal=USR1@600, before the time limit), and with Ctrl-C.
#
# The trainer saves a checkpoint on either and exits 75 ("run again to resume"; launch/slurm/*.sbatch
# requeue on it). One that reaches the script before any trainer runs (option parsing, the SLURM
# environment, the preflight, torchrun's rendezvous, DeepSpeed's runner starting) ends it with 75 as
# well: nothing was trained, so nothing is lost, and the same command starts again. The preflight and
# the launcher run in the background so that `wait` returns when a signal comes: bash runs a trap only
# after the foreground command ends.

# shellcheck disable=SC2034  # interrupted is read by the sourcing script
stop_signal=""     # TERM or USR1, once one reached this script
signal_caught=0    # a trap ran since the last `wait` began (it returned early)
interrupted=0      # Ctrl-C while waiting for a child
child_pid=""       # the background command wait_child waits for
status_file=""     # the file the trainer writes its exit status to (node 0: the caller's)
workers_parent=""  # deepspeed.sh: the workers' parent is child_pid's child running this (DeepSpeed's launch.py)
parent_pid=""      # that process, once child_pid started it

# on_stop_signal TERM|USR1: the trap. Before training (no `forward_stop_signal` armed) the script ends with 75.
on_stop_signal() {
  signal_caught=1
  stop_signal="$1"
  if [[ "${stop_forwarding:-0}" == 1 ]]; then forward_stop_signal "$1"; else stop_before_training; fi
}
trap 'on_stop_signal TERM' TERM
trap 'on_stop_signal USR1' USR1

# stop_before_training: ends a background preflight (it ignores the stop signals, so that one sent to
# every process of a SLURM step cannot make it fail first) and the script with 75.
stop_before_training() {
  if [[ -n "$child_pid" ]]; then kill_tree "$child_pid"; fi
  report_stopped_before_training
  exit 75
}

report_stopped_before_training() {
  echo "launch/${0##*/}: SIG$stop_signal before training started: stopping with exit status 75" \
    "(nothing to save; the same command starts again)" >&2
  record_exit_status 75
}

# record_exit_status N: what the trainer would have written to its status file. Before the script
# has chosen the file, the caller's, if it exists here (the sbatch script creates it on node 0's host).
record_exit_status() {
  local file="$status_file"
  if [[ -z "$file" && -n "${RETNET_EXIT_STATUS_FILE:-}" && -f "$RETNET_EXIT_STATUS_FILE" ]]; then
    file="$RETNET_EXIT_STATUS_FILE"
  fi
  if [[ -n "$file" ]]; then echo "$1" > "$file" || true; fi
}

# children_of PID: the pids of PID's child processes.
children_of() {
  if [[ -e /proc/$$/task/$$/children ]]; then
    cat /proc/"$1"/task/*/children 2>/dev/null || true
  else
    pgrep -P "$1" || true
  fi
}

# kill_tree PID: SIGKILL to PID and every process below it.
kill_tree() {
  local pid
  for pid in $(children_of "$1"); do kill_tree "$pid"; done
  kill -KILL "$1" 2>/dev/null || true
}

# shielded CMD...: CMD in the foreground with the stop signals ignored, so that one sent to every
# process of a SLURM step ends the script with 75 (the trap runs once CMD is done) rather than failing CMD.
shielded() { ( trap '' TERM USR1; exec "$@" ); }

# in_background IGNORED CMD...: starts CMD in the background as child_pid, with the signals IGNORED
# (a word list, maybe empty) ignored and Ctrl-C's SIGINT and SIGQUIT at their defaults (bash starts
# a background command with them ignored; Ctrl-C must reach it as it reaches a foreground one).
in_background() {
  local ignored="$1"
  shift
  # shellcheck disable=SC2086  # IGNORED is a list of signal names
  ( trap '' $ignored; trap - INT QUIT; exec "$@" ) &
  child_pid=$!
}

# wait_child: waits for child_pid to end and sets child_status to its exit status. A trap makes `wait`
# return early; then it waits again (bash keeps a finished child's status for another `wait`). Ctrl-C
# reaches the child too (the whole foreground process group gets it): the script waits for it to end.
wait_child() {
  trap 'signal_caught=1; interrupted=1' INT
  while :; do
    signal_caught=0
    child_status=0
    wait "$child_pid" || child_status=$?
    if (( ! signal_caught || child_status <= 128 )); then break; fi
  done
  trap - INT
  child_pid=""
}

# run_preflight FAILURE CMD...: the preflight CMD in the background with the stop signals ignored (one
# ends the script with 75 through its trap); Ctrl-C ends the script with 130, a failed check with FAILURE.
run_preflight() {
  local failure="$1"
  shift
  in_background "TERM USR1" "$@"
  wait_child
  if (( interrupted )); then exit 130; fi
  if [[ "$child_status" != 0 ]] && ! "$PYTHON" -c 'import hydra, torch' 2>/dev/null; then
    die "$failure: $PYTHON cannot import torch and hydra (the python these scripts use: PYTHON, else" \
      "the repository's .venv, else python3); set PYTHON to your environment's python or run make setup"
  fi
  [[ "$child_status" == 0 ]] || die "$failure"
}

# forward_stop_signal TERM|USR1 (while the launcher runs as child_pid): to the workers (the trainer's
# ranks) only. Their handler records a signal, so a second copy (SLURM signals every process of the
# step) is harmless; a second SIGTERM to torchrun's agent would abort its shutdown, which waits for the
# workers to save, and one to DeepSpeed's launch.py makes it SIGKILL them 30 s later. No worker yet
# (rendezvous, the launchers starting): SIGTERM to the launcher's processes, nothing was trained.
forward_stop_signal() {
  local workers
  if [[ -z "$child_pid$parent_pid" ]]; then return 0; fi  # not started yet: the script looks at stop_signal next
  if [[ -n "$workers_parent" && -z "$parent_pid" ]]; then find_workers_parent; fi
  workers="$(trainer_workers)"
  if [[ -n "$workers" ]]; then
    local pid
    for pid in $workers; do
      # a worker inherits SIGUSR1 ignored from its launcher until the trainer's handler is in place: it
      # would lose the warning and train on to the time limit. SIGTERM ends it before anything was
      # trained (or, handled by then, stops the trainer alike).
      if [[ "$1" == USR1 ]] && ignores_usr1 "$pid"; then
        kill -TERM "$pid" 2>/dev/null || true
      else
        kill -s "$1" "$pid" 2>/dev/null || true
      fi
    done
  else
    # shellcheck disable=SC2086  # one or two pids
    kill -TERM $child_pid $parent_pid 2>/dev/null || true
  fi
}

# ignores_usr1 PID: PID ignores SIGUSR1 (signal 10: bit 9 of SigIgn in /proc/PID/status); false
# where that cannot be read.
ignores_usr1() {
  local mask
  mask="$(sed -n 's/^SigIgn:[[:space:]]*//p' "/proc/$1/status" 2>/dev/null)" || return 1
  [[ "$mask" =~ ^[0-9a-fA-F]+$ ]] && (( (16#${mask: -4} >> 9) & 1 ))
}

# trainer_workers: the pids of the trainer's ranks on this node: torchrun's children, or launch.py's.
trainer_workers() {
  if [[ -z "$workers_parent" ]]; then
    children_of "$child_pid"
  elif [[ -n "$parent_pid" ]]; then
    children_of "$parent_pid"
  fi
}

# command_of PID: PID's command line, its arguments joined by spaces; empty once PID has exited.
command_of() {
  if [[ -e /proc/$$/cmdline ]]; then
    tr '\0' ' ' 2>/dev/null < "/proc/$1/cmdline" || true  # 2> first: the shell reports an exited PID there
  else
    ps -o args= -p "$1" 2>/dev/null || true
  fi
}

# find_workers_parent: sets parent_pid to child_pid's child that runs $workers_parent in Python, if
# it has one (not pdsh, whose command names it too: DeepSpeed's default hostfile, /job/hostfile).
find_workers_parent() {
  local pid cmd program
  for pid in $(children_of "$child_pid"); do
    cmd="$(command_of "$pid")"
    program="${cmd%% *}"
    if [[ "${program##*/}" == python* && "$cmd" == *" $workers_parent "* ]]; then parent_pid="$pid"; fi
  done
}

# wait_launcher: wait_child, and for the workers' parent when it is below child_pid. DeepSpeed's runner
# dies of a SIGTERM to every process (SLURM) or of Ctrl-C at once, while its child launch.py waits for
# the workers to save; the script, SLURM's task or a container's first process, must outlive them.
# So launch.py's pid is taken while the runner lives.
wait_launcher() {
  local polls=0
  trap 'signal_caught=1; interrupted=1' INT
  while [[ -n "$workers_parent" && -z "$parent_pid" && -n "$(command_of "$child_pid")" ]]; do
    find_workers_parent
    # every second after a minute: a runner that started pdsh (DeepSpeed's /job/hostfile) never starts it
    if (( ++polls < 600 )); then sleep 0.1 || true; else sleep 1 || true; fi  # || true: Ctrl-C ends sleep
  done
  wait_child
  trap 'signal_caught=1; interrupted=1' INT
  while [[ -n "$parent_pid" && "$(command_of "$parent_pid")" == *"$workers_parent"* ]]; do sleep 0.2 || true; done
  trap - INT
  parent_pid=""
}

# use_status_file NODE_RANK: the trainer's status file: the caller's on node 0 (the sbatch script's),
# else a temporary one; exported for the trainer.
use_status_file() {
  status_file="${RETNET_EXIT_STATUS_FILE:-}"
  if [[ -z "$status_file" || "$1" != 0 ]]; then
    status_file="$(mktemp "${TMPDIR:-/tmp}/retnet-exit.XXXXXX")"
    trap 'rm -f "$status_file"' EXIT
    export RETNET_EXIT_STATUS_FILE="$status_file"
  fi
}

# exit_like_the_trainer RC: ends the script after the launcher ended with RC. Launchers end with 1
# whenever a worker fails, whatever its status; the trainer's 75 ("stopped by a signal after saving a
# checkpoint: run again to resume", on which launch/slurm/*.sbatch requeue) comes from its status file.
exit_like_the_trainer() {
  local rc="$1" trainer_status
  trainer_status="$(cat "$status_file" 2>/dev/null || true)"
  if [[ -z "$trainer_status" && -n "$stop_signal" && "$rc" != 0 ]]; then
    # no worker recorded the signal: the launcher stopped before starting them, or they ended before
    # their handler was in place (the interpreter starting)
    report_stopped_before_training
    rc=75
  elif [[ "$rc" != 0 && "$trainer_status" == 75 ]]; then
    rc=75
  elif (( interrupted )); then
    rc=130
  fi
  exit "$rc"
}

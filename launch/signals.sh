# shellcheck shell=bash
# Sourced by launch/common.sh: what launch/torchrun.sh and launch/deepspeed.sh do with the stop signals,
# SIGTERM (preemption) and SIGUSR1 (sbatch --signal=USR1@600, before the time limit), and with Ctrl-C.
#
# The trainer saves a checkpoint on either and exits 75 ("run again to resume"; launch/slurm/*.sbatch
# requeue on it). One that reaches the script before any trainer runs (option parsing, the SLURM
# environment, the preflight, torchrun's rendezvous) ends it with 75 as well: nothing was trained, so
# nothing is lost, and the same command starts again. The preflight and the launcher run in the
# background so that `wait` returns when a signal comes: bash runs a trap only after the foreground
# command ends.

# shellcheck disable=SC2034  # interrupted is read by the sourcing script
stop_signal=""     # TERM or USR1, once one reached this script
signal_caught=0    # a trap ran since the last `wait` began (it returned early)
interrupted=0      # Ctrl-C while waiting for a child
child_pid=""       # the background command wait_child waits for
status_file=""     # the file the trainer writes its exit status to (torchrun.sh, node 0: the caller's)

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

# forward_stop_signal TERM|USR1 (torchrun.sh, while torchrun runs as child_pid): to torchrun's workers
# (the trainer's ranks) only. Their handler records a signal, so a second copy (SLURM signals every
# process of the step) is harmless; a second SIGTERM to torchrun would abort its shutdown, which waits
# for the workers to save. No worker yet (rendezvous): SIGTERM to torchrun, nothing was trained.
forward_stop_signal() {
  local workers
  if [[ -z "$child_pid" ]]; then return 0; fi  # not started yet: the script looks at stop_signal next
  workers="$(children_of "$child_pid")"
  if [[ -n "$workers" ]]; then
    # shellcheck disable=SC2086  # a list of pids
    kill -s "$1" $workers 2>/dev/null || true
  else
    kill -TERM "$child_pid" 2>/dev/null || true
  fi
}

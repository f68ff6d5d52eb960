#!/usr/bin/env bash
# Launch retnet_train.train with the DeepSpeed launcher from one machine: this node alone, or the
# nodes of an MPI-style hostfile ("host slots=N" a line) reached by passwordless ssh (pdsh).
# Runs the preflight first, on every node through the same launcher.
#
#   launch/deepspeed.sh [options] [--] [hydra overrides ...]
#
#   launch/deepspeed.sh --num-gpus 8 model=1.3b experiment=retnet_1.3b_8k
#   launch/deepspeed.sh --hostfile hosts.txt model=6.7b checkpoint.dir=/shared/ckpt
#   launch/deepspeed.sh --slurm model=6.7b    # inside salloc/sbatch: hostfile from SLURM_JOB_NODELIST
#
# Options (environment variable in brackets):
#   --hostfile F        hostfile [HOSTFILE]; checked before launching (DeepSpeed itself silently
#                       falls back to this node when the file is missing)
#   --slurm             write the hostfile from SLURM_JOB_NODELIST, slots = GPUs per node (equal on
#                       every node: a job whose nodes hold different counts needs --hostfile or --num-gpus)
#   --num-gpus N        GPUs to use per node (deepspeed --num_gpus)
#   --num-nodes N       use the first N hosts of the hostfile
#   --include SPEC      deepspeed --include, e.g. "worker-0@worker-1:0,2"
#   --master-addr A     node 0's address [MASTER_ADDR]; default: the first host that runs (--include)
#   --master-port P     [MASTER_PORT]; default 29500; with --slurm the job's (10000 + SLURM_JOB_ID % 50000)
#   --launcher L        pdsh (default), openmpi, mvapich, mpich, impi or slurm
#   --module M          python module to run; default retnet_train.train
#   --checkpoint-dir D  for the preflight; normally it comes from the trainer config
#                       (checkpoint.dir / run.dir overrides) and must agree with it
#   --params N          parameter count for the free-space check (else from the trainer config)
#   --require-gpu       preflight fails without a GPU
#   --no-preflight      skip the preflight
#   --dry-run           print the hostfile, per-node rank layout, environment and exact commands
# Everything from the first argument that is not an option (or after --) goes to the program
# verbatim. The launcher gets --no_local_rank: Hydra would reject an appended --local_rank=N.
set -euo pipefail

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

hostfile="${HOSTFILE:-}"
use_slurm=0
num_gpus=""
num_nodes=""
include=""
master_addr="${MASTER_ADDR:-}"
master_port="${MASTER_PORT:-}"
launcher="pdsh"

while [[ $# -gt 0 ]]; do
  shared_option "$@"
  if (( taken )); then shift "$taken"; continue; fi
  case "$1" in
    --hostfile) need_value "$@"; hostfile="$2"; shift 2 ;;
    --slurm) use_slurm=1; shift ;;
    --num-gpus) need_value "$@"; num_gpus="$2"; shift 2 ;;
    --num-nodes) need_value "$@"; num_nodes="$2"; shift 2 ;;
    --include) need_value "$@"; include="$2"; shift 2 ;;
    --master-addr) need_value "$@"; master_addr="$2"; shift 2 ;;
    --master-port) need_value "$@"; master_port="$2"; shift 2 ;;
    --launcher) need_value "$@"; launcher="$2"; shift 2 ;;
    --) shift; break ;;
    -*) die "unknown option $1 (program arguments that start with - go after --)" ;;
    *) break ;;
  esac
done
prog_args=("$@")

# pdsh_quote ARG...: sets pdsh_args to each ARG as DeepSpeed's pdsh runner must receive it for the remote
# login shell to hand it to the program unchanged. pdsh joins the command into one line for that shell;
# the runner wraps an argument that holds a space in double quotes, escaping only '"', and leaves the
# others bare. So: inside those double quotes \ $ ` are escaped; any other argument is single-quoted.
pdsh_quote() {
  local a c i out
  pdsh_args=()
  for a in "$@"; do
    out=""
    for (( i = 0; i < ${#a}; i++ )); do
      c="${a:i:1}"
      if [[ "$a" != *" "* ]]; then
        [[ "$c" == "'" ]] && c="'\''"
      elif [[ "$c" == [\\\$\`] ]]; then
        c="\\$c"
      fi
      out+="$c"
    done
    if [[ "$a" == *" "* ]]; then pdsh_args+=("$out"); else pdsh_args+=("'$out'"); fi
  done
}

[[ -z "$num_gpus" ]] || check_int "--num-gpus" num_gpus 1 1024
[[ -z "$num_nodes" ]] || check_int "--num-nodes" num_nodes 1 100000
case "$launcher" in pdsh|openmpi|mvapich|mpich|impi|slurm) ;; *) die "--launcher must be pdsh, openmpi, mvapich, mpich, impi or slurm, got '$launcher'" ;; esac
[[ "$module" =~ ^[A-Za-z_][A-Za-z0-9_.]*$ ]] || die "--module must be a python module name, got '$module'"
if [[ -n "$params" && ! "$params" =~ ^[0-9.]+([eE][0-9]+)?$ ]]; then die "--params must be a number like 1.3e9, got '$params'"; fi

if [[ "$use_slurm" == 1 ]]; then
  [[ -z "$hostfile" ]] || die "--slurm and --hostfile exclude each other"
  # slots: GPUs per node; the port is the job's, as torchrun.sh --slurm takes it (two jobs sharing a node)
  slurm_args=(env --format json --node-rank 0)
  [[ -z "$num_gpus" ]] || slurm_args+=(--nproc-per-node "$num_gpus")
  slurm_view="$(shielded "$PYTHON" -m retnet_train.preflight.launch_env "${slurm_args[@]}" \
    | shielded "$PYTHON" -c 'import json, sys; e = json.load(sys.stdin); print(e["nproc_per_node"], e["master_port"], e["nnodes"], e["world_size"])')" \
    || die "cannot derive GPUs per node and the port from SLURM (see above; --num-gpus N gives the GPUs)"
  read -r slots slurm_port slurm_nodes slurm_world <<<"$slurm_view"
  # one slots= for every host: nodes with different GPU counts (--gpus=12: 8 + 4) need a hostfile of their own
  (( slurm_world == slots * slurm_nodes )) || die "SLURM_GPUS=$slurm_world over $slurm_nodes nodes is not $slots on each:" \
    "write a hostfile with each node's GPUs (--hostfile), pass --num-gpus N (N on every node) or use launch/slurm/*.sbatch"
  master_port="${master_port:-$slurm_port}"
  hostfile="${TMPDIR:-/tmp}/retnet-hostfile-${SLURM_JOB_ID:-$$}"
  hostfile_text="$(shielded "$PYTHON" -m retnet_train.preflight.launch_env hostfile --slots "$slots")" || die "cannot build a hostfile from SLURM"
  if [[ "$dry_run" != 1 ]]; then printf '%s\n' "$hostfile_text" > "$hostfile"; fi
  hosts_text="$(printf '%s\n' "$hostfile_text" | sed 's/ slots=/ /')"
elif [[ -n "$hostfile" ]]; then
  hosts_text="$(shielded "$PYTHON" -m retnet_train.preflight.launch_env check-hostfile "$hostfile")" || die "bad hostfile (see above)"
else
  hosts_text=""
fi
master_port="${master_port:-29500}"
check_int "--master-port/MASTER_PORT" master_port 1 65535

# first_running_host: the hostfile's first host that --include keeps (DeepSpeed runs the hosts in the
# hostfile's order), where the rendezvous must be
first_running_host() {
  local host _ named
  named=" $(tr '@' '\n' <<<"$include" | cut -d: -f1 | tr '\n' ' ')"
  while read -r host _; do
    if [[ -z "$include" || "$named" == *" $host "* ]]; then printf '%s\n' "$host"; return; fi
  done <<<"$hosts_text"
}

ds=("$PYTHON" -m deepspeed.launcher.runner)
if [[ -n "$hosts_text" ]]; then
  [[ -z "$num_nodes" || -z "$include" ]] || die "--num-nodes and --include exclude each other (DeepSpeed refuses both)"
  n_hosts="$(grep -c . <<<"$hosts_text")"
  [[ -z "$num_nodes" ]] || (( num_nodes <= n_hosts )) || die "--num-nodes $num_nodes: the hostfile lists $n_hosts hosts"
  ds+=(--hostfile "$hostfile" --launcher "$launcher")
  if [[ -z "$master_addr" ]]; then
    master_addr="$(first_running_host)"
    [[ -n "$master_addr" ]] || die "--include $include names no host of ${hostfile}"
  fi
fi
through_pdsh=0
if [[ -n "$hosts_text" && "$launcher" == pdsh ]]; then
  # pdsh passes the programs' arguments through a remote shell (pdsh_quote); --force_multi keeps them on
  # that path when the filters leave one host, which DeepSpeed would otherwise start here, unquoted
  through_pdsh=1
  ds+=(--force_multi)
fi
[[ -n "$master_addr" ]] && ds+=(--master_addr "$master_addr")
ds+=(--master_port "$master_port")
[[ -n "$num_gpus" ]] && ds+=(--num_gpus "$num_gpus")
[[ -n "$num_nodes" ]] && ds+=(--num_nodes "$num_nodes")
[[ -n "$include" ]] && ds+=(--include "$include")
ds+=(--no_local_rank --module)
# launched MODULE ARG...: the launcher's command for MODULE with ARG..., quoted for pdsh when it runs them
launched() {
  local target="$1"; shift
  if (( through_pdsh && $# )); then pdsh_quote "$@"; set -- "${pdsh_args[@]}"; fi
  launched_cmd=("${ds[@]}" "$target" "$@")
}
launched "$module" "${prog_args[@]}"
run=("${launched_cmd[@]}")

# The preflight runs through the same launcher, once per node (local rank 0 checks, the other
# ranks exit at once), so a checkpoint dir that is not shared between the hosts fails here.
shared_id="ds-${SLURM_JOB_ID:-$(date +%s)-$$}"
check=(--from-launcher-env --shared-id "$shared_id")
add_preflight_options
add_preflight_program_args
launched retnet_train.preflight "${check[@]}"
check=("${launched_cmd[@]}")


if [[ "$dry_run" == 1 ]]; then
  if [[ -n "$hosts_text" ]]; then
    if [[ "$use_slurm" == 1 ]]; then src=" (written from SLURM_JOB_NODELIST)"; else src=""; fi
    echo "# hostfile ${hostfile}${src}: node, host, slots, global ranks (before --num-gpus/--num-nodes/--include):"
    rank=0; node=0
    while read -r host slots; do
      echo "#   node $node: $host slots=$slots ranks $rank-$((rank + slots - 1))"
      rank=$((rank + slots)); node=$((node + 1))
    done <<<"$hosts_text"
    echo "# every node: deepspeed.launcher.launch --node_rank=<node> starts one process per slot with"
    echo "#   RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR=$master_addr, MASTER_PORT=$master_port"
    if [[ "$launcher" == pdsh ]]; then echo "# (program arguments quoted once more: pdsh runs them in a remote shell)"; fi
    if [[ "$use_slurm" == 1 ]]; then
      # the commands read it; DeepSpeed without its hostfile would train on this node alone
      echo "# the hostfile, written as the run writes it:"
      mapfile -t hostfile_lines <<<"$hostfile_text"
      echo "$(quote printf '%s\n' "${hostfile_lines[@]}") > $(printf '%q' "$hostfile")"
    fi
  else
    echo "# this node only (no hostfile): one process per visible GPU${num_gpus:+ (--num-gpus $num_gpus)}"
    echo "# (started with SIGUSR1 ignored: the trainer's workers handle it, the runner and launch.py must not die of it)"
  fi
  echo "# environment (remote nodes get NCCL_*/PYTHON* and what .deepspeed_env lists):"
  print_env_and_preflight
  echo "# command:"
  quote "${run[@]}"
  exit 0
fi

if [[ -z "$hosts_text" ]]; then use_status_file 0; fi  # this node is node 0
if [[ "$preflight" == 1 ]]; then
  run_preflight "preflight failed (see above); training was not started" "${check[@]}"
fi
# With a hostfile the workers run on the hosts under pdsh/ssh (or mpirun, srun), out of this script's
# reach: the script becomes the runner, whose own handling applies (launch/README.md).
if [[ -n "$hosts_text" ]]; then exec "${run[@]}"; fi
# This node: runner -> launch.py -> the workers. From here a stop signal to this script goes to the
# workers (signals.sh: forward_stop_signal), never to the runner or launch.py: the runner has no
# handler and dies of it, leaving launch.py and the workers training; launch.py SIGTERMs the workers
# and SIGKILLs them 30 s later. SIGUSR1, "checkpoint and stop", kills either by default: they ignore
# it (the disposition survives exec); the trainer installs its own handler.
stop_forwarding=1
workers_parent=deepspeed.launcher.launch
in_background USR1 "${run[@]}"
if [[ -n "$stop_signal" ]]; then forward_stop_signal "$stop_signal"; fi  # came while the runner was starting
wait_launcher
exit_like_the_trainer "$child_status"

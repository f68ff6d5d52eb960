#!/usr/bin/env bash
# Launch retnet_train.train with torchrun on this node: one node (--standalone) or one node of a
# multi-node job (c10d rendezvous at MASTER_ADDR:MASTER_PORT). Runs the preflight first.
#
#   launch/torchrun.sh [options] [--] [hydra overrides ...]
#
#   launch/torchrun.sh experiment=tiny_cpu model=tiny train.max_steps=3
#   # node 0 and node 1 of a two-node job (same command on both, only --node-rank differs):
#   launch/torchrun.sh --nnodes 2 --node-rank 0 --master-addr gpu001 --nproc-per-node 8 model=1.3b
#
# Options (environment variable in brackets; an option wins over the variable):
#   --nproc-per-node N  processes on this node [NPROC_PER_NODE]; default: visible GPUs, 1 on CPU
#   --nnodes N          nodes in the job [NNODES]; default 1
#   --node-rank R       this node's rank, 0..N-1 [NODE_RANK]; default 0
#   --master-addr A     node 0's address, hosts the c10d store [MASTER_ADDR]; needed for --nnodes > 1
#                       (127.0.0.1 where all nodes run on this machine); one node: 127.0.0.1
#   --master-port P     rendezvous port [MASTER_PORT]; default 29500
#   --rdzv-id ID        rendezvous id, equal on all nodes [RDZV_ID]; default retnet
#   --slurm             take nnodes, node rank, master addr/port, GPUs on this node and the job's world
#                       size from SLURM (python -m retnet_train.preflight.launch_env); used by
#                       launch/slurm/*.sbatch via srun; --nproc-per-node, --master-addr, --master-port,
#                       --rdzv-id still win. Nodes may have different GPU counts (--gpus=12: 8 + 4).
#                       OMP_NUM_THREADS, unless set: this task's CPUs (SLURM_CPUS_PER_TASK, else
#                       SLURM_CPUS_ON_NODE) / the processes on this node, at least 1
#   --module M          python module to run; default retnet_train.train
#   --checkpoint-dir D  for the preflight; normally it comes from the trainer config
#                       (checkpoint.dir / run.dir overrides) and must agree with it
#   --params N          parameter count for the free-space check (else from the trainer config)
#   --require-gpu       preflight fails without a GPU
#   --vendor V          cuda | rocm: preflight fails when torch is another build
#   --rocr-devices-only where ROCR_VISIBLE_DEVICES is set, unset HIP_VISIBLE_DEVICES, CUDA_VISIBLE_DEVICES
#                       and GPU_DEVICE_ORDINAL: they index into what ROCR leaves visible, and SLURM sets
#                       them with the same global ids in every task (launch/slurm/rocm.sbatch passes it)
#   --no-preflight      skip the preflight
#   --dry-run           print this node's environment and exact commands; start nothing
# Everything from the first argument that is not an option (or after --) goes to the program
# verbatim: Hydra overrides, or e.g. `--module retnet_train.preflight -- --dist-check`.
set -euo pipefail

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

nproc="${NPROC_PER_NODE:-}"
nnodes="${NNODES:-1}"
node_rank="${NODE_RANK:-0}"
master_addr="${MASTER_ADDR:-}"  # required for several nodes; one node: 127.0.0.1
master_port="${MASTER_PORT:-29500}"
rdzv_id="${RDZV_ID:-retnet}"
vendor=""
use_slurm=0
rocr_only=0
world_size=""  # --slurm: the job's; else nnodes x nproc
given=()  # the rendezvous options given, as the variables that --slurm's helper reads (they win there too)
nodes_option=""  # --nnodes or --node-rank, refused with --slurm

while [[ $# -gt 0 ]]; do
  shared_option "$@"
  if (( taken )); then shift "$taken"; continue; fi
  case "$1" in
    --nproc-per-node) need_value "$@"; nproc="$2"; shift 2 ;;
    --nnodes) need_value "$@"; nnodes="$2"; nodes_option="$1"; shift 2 ;;
    --node-rank) need_value "$@"; node_rank="$2"; nodes_option="$1"; shift 2 ;;
    --master-addr) need_value "$@"; master_addr="$2"; given+=("MASTER_ADDR=$2"); shift 2 ;;
    --master-port) need_value "$@"; master_port="$2"; given+=("MASTER_PORT=$2"); shift 2 ;;
    --rdzv-id) need_value "$@"; rdzv_id="$2"; given+=("RDZV_ID=$2"); shift 2 ;;
    --slurm) use_slurm=1; shift ;;
    --vendor) need_value "$@"; vendor="$2"; shift 2 ;;
    --rocr-devices-only) rocr_only=1; shift ;;
    --) shift; break ;;
    -*) die "unknown option $1 (program arguments that start with - go after --)" ;;
    *) break ;;
  esac
done
prog_args=("$@")

# Here, in the task srun started on this node, not on the batch host: srun sets the masks again.
if [[ "$rocr_only" == 1 && -n "${ROCR_VISIBLE_DEVICES:-}" ]]; then
  unset HIP_VISIBLE_DEVICES CUDA_VISIBLE_DEVICES GPU_DEVICE_ORDINAL
fi

if [[ "$use_slurm" == 1 ]]; then
  [[ -z "$nodes_option" ]] || die "$nodes_option cannot be given with --slurm: SLURM's node count and SLURM_NODEID set it"
  slurm_args=(env --format shell)
  [[ -n "$nproc" ]] && slurm_args+=(--nproc-per-node "$nproc")
  exports="$(shielded env "${given[@]}" "$PYTHON" -m retnet_train.preflight.launch_env "${slurm_args[@]}")" \
    || die "cannot derive the launch environment from SLURM (see above)"
  eval "$exports"
  nproc="$NPROC_PER_NODE"; nnodes="$NNODES"; node_rank="$NODE_RANK"
  world_size="${WORLD_SIZE:?}"  # set by the eval above
  master_addr="$MASTER_ADDR"; master_port="$MASTER_PORT"; rdzv_id="$RDZV_ID"
fi

if [[ -z "$nproc" ]]; then
  nproc="$(shielded "$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 1)')" \
    || die "cannot count GPUs with $PYTHON (torch import failed); pass --nproc-per-node"
fi
check_int "--nproc-per-node/NPROC_PER_NODE" nproc 1 1024
check_int "--nnodes/NNODES" nnodes 1 100000
check_int "--node-rank/NODE_RANK" node_rank 0 $((nnodes - 1))
check_int "--master-port/MASTER_PORT" master_port 1 65535
# Here, in each node's task: its CPUs (the step's --cpus-per-task, else all the job has on this node) over the
# processes this node starts, at least 1; unless set already (by you, a site module)
task_cpus="${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-}}"
if [[ "$use_slurm" == 1 && -z "${OMP_NUM_THREADS:-}" && "$task_cpus" =~ ^[0-9]+$ ]]; then
  export OMP_NUM_THREADS="$(( 10#$task_cpus / nproc > 0 ? 10#$task_cpus / nproc : 1 ))"
fi
# every node's processes; under SLURM the job's GPUs, which nodes may hold in different numbers
world_size="${world_size:-$((nnodes * nproc))}"
if [[ -z "$master_addr" ]]; then
  # 127.0.0.1 on every node would give each node a rendezvous of its own: give it, even if all nodes are here
  (( 10#$nnodes == 1 )) || die "--nnodes $nnodes needs --master-addr (or MASTER_ADDR): node 0's address, the same on every node"
  master_addr=127.0.0.1
fi
[[ -n "$master_addr" && "$master_addr" != *[[:space:]]* ]] || die "--master-addr/MASTER_ADDR is empty or has spaces: '$master_addr'"
[[ "$rdzv_id" =~ ^[A-Za-z0-9_.-]+$ ]] || die "--rdzv-id/RDZV_ID may only contain letters, digits, _ . -, got '$rdzv_id'"
[[ "$module" =~ ^[A-Za-z_][A-Za-z0-9_.]*$ ]] || die "--module must be a python module name, got '$module'"
[[ -z "$vendor" || "$vendor" == cuda || "$vendor" == rocm ]] || die "--vendor must be cuda or rocm, got '$vendor'"
if [[ -n "$params" ]]; then
  [[ "$params" =~ ^[0-9.]+([eE][0-9]+)?$ ]] || die "--params must be a number like 1.3e9, got '$params'"
fi

run=("$PYTHON" -m torch.distributed.run --nproc_per_node="$nproc")
if (( nnodes == 1 )); then
  run+=(--standalone)
else
  if (( node_rank == 0 )); then is_host=1; else is_host=0; fi
  # c10d assigns global ranks itself (node_rank is not passed: torchrun ignores it for c10d);
  # node 0 hosts the rendezvous store.
  run+=(--nnodes="$nnodes" --rdzv_backend=c10d
        --rdzv_endpoint="$master_addr:$master_port" --rdzv_id="$rdzv_id" --rdzv_conf="is_host=$is_host"
        --max_restarts=0)
fi
run+=(-m "$module" "${prog_args[@]}")

check=("$PYTHON" -m retnet_train.preflight --nproc-per-node "$nproc" --nnodes "$nnodes" --node-rank "$node_rank"
       --world-size "$world_size" --shared-id "$rdzv_id")
add_preflight_options
[[ -n "$vendor" ]] && check+=(--vendor "$vendor")
add_preflight_program_args


if [[ "$dry_run" == 1 ]]; then
  echo "# node $node_rank of $nnodes: $nproc process(es), world size $world_size, rendezvous $master_addr:$master_port id=$rdzv_id"
  if (( world_size != nnodes * nproc )); then
    echo "# (the nodes hold different numbers of GPUs: each starts one process per GPU it has, SLURM_GPUS_ON_NODE there)"
  fi
  echo "# environment:"
  echo "export MASTER_ADDR=$(printf '%q' "$master_addr")"
  echo "export MASTER_PORT=$master_port"
  echo "export NNODES=$nnodes"
  echo "export NODE_RANK=$node_rank"
  echo "export NPROC_PER_NODE=$nproc"
  echo "export WORLD_SIZE=$world_size"
  print_env_and_preflight
  echo "# (started with SIGUSR1 ignored: the trainer's workers handle it, torchrun's agent must not die of it)"
  echo "# command:"
  quote "${run[@]}"
  exit 0
fi

# torchrun ends with 1 whenever a worker fails, whatever the worker's exit status; the trainer also
# writes its status to RETNET_EXIT_STATUS_FILE, and this script ends with the workers' 75 ("stopped by
# a signal after saving a checkpoint: run again to resume"), on which launch/slurm/*.sbatch requeue.
use_status_file "$node_rank"
if [[ "$preflight" == 1 ]]; then
  run_preflight "preflight failed on node $node_rank (host $(hostname)); nothing was started" "${check[@]}"
fi
export MASTER_ADDR="$master_addr" MASTER_PORT="$master_port"
# From here a stop signal to this script goes to the workers (signals.sh: forward_stop_signal).
# SIGUSR1 is the "checkpoint and stop" warning (sbatch --signal=USR1@600; the trainer handles it
# on every rank). SLURM signals every process of the step, torchrun's agent included, whose
# default action is to die; the step would then end and take the checkpointing workers with it.
# The agent ignores USR1 (the disposition survives exec); the trainer installs its own handler.
stop_forwarding=1
in_background USR1 "${run[@]}"
if [[ -n "$stop_signal" ]]; then forward_stop_signal "$stop_signal"; fi  # came while torchrun was starting
wait_child
exit_like_the_trainer "$child_status"

# shellcheck shell=bash
# Shared by launch/slurm/nvidia.sbatch and launch/slurm/rocm.sbatch (sourced, not run).
# The caller sets ROOT (the repository), PYTHON and VENDOR (nvidia|rocm), then calls slurm_main "$@".

die() { echo "launch/slurm/${VENDOR}.sbatch: error: $*" >&2; exit 2; }

# set_default NAME VALUE: export NAME=VALUE unless the user or a site module already set it.
set_default() {
  if [[ -z "${!1:-}" ]]; then export "$1=$2"; fi
}

slurm_usage() {
  cat <<EOF
usage: sbatch [sbatch options] launch/slurm/${VENDOR}.sbatch [options] [--] [hydra overrides ...]

One srun task per node runs launch/torchrun.sh --slurm, which takes node rank, world size and
master address/port from SLURM (python -m retnet_train.preflight.launch_env), runs the preflight (checkpoint
dir shared by all nodes, GPUs, versions, disk) and starts torchrun with c10d rendezvous.

options:
  --checkpoint-dir D  for the preflight; normally it comes from the trainer
                      config (checkpoint.dir=... / run.dir=... overrides) and must agree with it
  --params N          parameter count for the free-space check (else from the trainer config)
  --allow-cpu         do not require GPUs (nor a CUDA/ROCm torch build) in the preflight
  --module M          run another module than retnet_train.train; a cluster smoke test before a
                      long run: --module retnet_train.preflight -- --dist-check (all_reduce, all nodes)
  --no-preflight      skip the preflight
  --dry-run           print the srun step and every node's environment and commands; start nothing
EOF
  if [[ "$VENDOR" == rocm ]]; then
    cat <<EOF
  --gpu KIND          mi200 | mi250x | mi300x: PYTORCH_ROCM_ARCH (gfx90a/gfx942) and RCCL tuning
  --slingshot         HPE Slingshot fabric (Frontier, LUMI, ...): libfabric cxi provider settings;
                      needs the aws-ofi-rccl plugin on LD_LIBRARY_PATH
EOF
  fi
}

# Environment shared by both vendors. Every value is a default: what is already set wins.
common_env() {
  local job="${SLURM_JOB_ID:-nojob}" user="${USER:-$(id -un)}"
  set_default NCCL_DEBUG WARN                 # prints the reason when a collective fails
  set_default PYTHONUNBUFFERED 1              # logs reach the .out file as they happen
  # fla compiles Triton kernels on first use; a cache on a shared home directory, written by
  # every rank of every node at once, is slow and can corrupt. /tmp is node-local.
  set_default TRITON_CACHE_DIR "/tmp/triton-cache-${user}-${job}"
  # OMP_NUM_THREADS: each node's task works it out from its own CPUs and GPUs (launch/torchrun.sh --slurm);
  # set here, this host's count would reach every node through srun
}

nvidia_env() {
  # CUDA_VISIBLE_DEVICES comes from SLURM's gres plugin; torchrun's LOCAL_RANK indexes into it.
  set_default PYTORCH_CUDA_ALLOC_CONF expandable_segments:True
}

rocm_env() {
  local job="${SLURM_JOB_ID:-nojob}" user="${USER:-$(id -un)}"
  # Device visibility: SLURM sets ROCR_VISIBLE_DEVICES on AMD nodes. HIP_VISIBLE_DEVICES and
  # CUDA_VISIBLE_DEVICES (both honoured by PyTorch on ROCm) index into what ROCR leaves visible,
  # so a second mask with the same global ids hides GPUs or picks the wrong ones: ROCR only. srun
  # sets the masks again in every task, so each node's task clears them (torchrun.sh
  # --rocr-devices-only, in slurm_main), not this batch host.
  # RCCL reads the NCCL_* variables (same names as NVIDIA's NCCL).
  set_default HSA_FORCE_FINE_GRAIN_PCIE 1     # fine-grained PCIe memory for RCCL peer transfers
  # MIOpen keeps a sqlite database under $HOME; many ranks on a shared home lock it. Node-local:
  set_default MIOPEN_USER_DB_PATH "/tmp/miopen-${user}-${job}"
  set_default MIOPEN_CUSTOM_CACHE_DIR "/tmp/miopen-${user}-${job}"
  case "$gpu_kind" in
    "") ;;
    mi200|mi250x) set_default PYTORCH_ROCM_ARCH gfx90a ;;   # MI250X: 2 GCDs per package, each its own device
    mi300x)
      set_default PYTORCH_ROCM_ARCH gfx942
      set_default NCCL_MIN_NCHANNELS 112 ;;                 # AMD's MI300X RCCL tuning guide
    *) die "--gpu must be mi200, mi250x or mi300x, got '$gpu_kind'" ;;
  esac
  if [[ "$slingshot" == 1 ]]; then
    set_default FI_PROVIDER cxi
    set_default NCCL_SOCKET_IFNAME hsn0,hsn1,hsn2,hsn3
    set_default NCCL_NET_GDR_LEVEL 3
    set_default FI_CXI_ATS 0
  fi
}

# slurm_main [options] [--] [overrides]: parse the sbatch script's arguments, set the vendor
# environment, then print (--dry-run) or run the srun step.
slurm_main() {
  local checkpoint_dir="" params="" allow_cpu=0 preflight=1 dry_run=0 module=""
  gpu_kind="" slingshot=0 task_cpus=""
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --checkpoint-dir) [[ -n "${2:-}" ]] || die "--checkpoint-dir needs a value"; checkpoint_dir="$2"; shift 2 ;;
      --params) [[ -n "${2:-}" ]] || die "--params needs a value"; params="$2"; shift 2 ;;
      --allow-cpu) allow_cpu=1; shift ;;
      --module) [[ -n "${2:-}" ]] || die "--module needs a value"; module="$2"; shift 2 ;;
      --no-preflight) preflight=0; shift ;;
      --dry-run) dry_run=1; shift ;;
      --gpu)
        [[ "$VENDOR" == rocm ]] || die "--gpu is an option of rocm.sbatch"
        [[ -n "${2:-}" ]] || die "--gpu needs a value (mi200, mi250x, mi300x)"; gpu_kind="$2"; shift 2 ;;
      --slingshot) [[ "$VENDOR" == rocm ]] || die "--slingshot is an option of rocm.sbatch"; slingshot=1; shift ;;
      -h|--help) slurm_usage; exit 0 ;;
      --) shift; break ;;
      -*) die "unknown option $1 (program arguments that start with - go after --)" ;;
      *) break ;;
    esac
  done
  local -a overrides=("$@")

  [[ -n "${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}}" ]] \
    || die "SLURM_JOB_NODELIST is unset: submit with sbatch (or run inside salloc); for one machine use launch/torchrun.sh"

  # CPUs for the one task per node: --cpus-per-task if the job asked, else every CPU the job has on
  # the node (an --exclusive job: all of them). Since Slurm 22.05 srun does not inherit
  # --cpus-per-task from sbatch, and without it the step gets one CPU per task: torchrun's
  # workers and data loading would share a single core.
  task_cpus="${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-}}"
  common_env
  if [[ "$VENDOR" == rocm ]]; then rocm_env; else nvidia_env; fi

  local -a node_args=(--slurm)
  [[ -n "$checkpoint_dir" ]] && node_args+=(--checkpoint-dir "$checkpoint_dir")
  [[ -n "$params" ]] && node_args+=(--params "$params")
  if [[ "$allow_cpu" != 1 ]]; then
    node_args+=(--require-gpu --vendor "$([[ "$VENDOR" == rocm ]] && echo rocm || echo cuda)")
  fi
  [[ "$preflight" == 1 ]] || node_args+=(--no-preflight)
  [[ -n "$module" ]] && node_args+=(--module "$module")
  [[ "$VENDOR" == rocm ]] && node_args+=(--rocr-devices-only)

  # One task per node; torchrun starts the per-GPU workers.
  local -a step=(srun --ntasks-per-node=1 --kill-on-bad-exit=1)
  [[ "$task_cpus" =~ ^[0-9]+$ ]] && step+=(--cpus-per-task="$task_cpus")
  step+=(bash "$ROOT/launch/torchrun.sh" "${node_args[@]}" -- "${overrides[@]}")

  # Check the allocation on the batch host before starting anything (names the bad variable).
  "${PYTHON}" -m retnet_train.preflight.launch_env env --node-rank 0 >/dev/null \
    || die "the SLURM environment does not describe a usable allocation (see above)"

  if [[ "$dry_run" == 1 ]]; then
    local hosts_text
    local -a hosts
    hosts_text="$("${PYTHON}" -m retnet_train.preflight.launch_env expand "${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}}")" \
      || die "cannot expand SLURM_JOB_NODELIST"
    mapfile -t hosts <<<"$hosts_text"
    echo "# ${VENDOR}.sbatch dry run: job ${SLURM_JOB_ID:-?}, ${#hosts[@]} node(s): ${hosts[*]}"
    echo "# srun step (run once from the batch host):"
    local a out=""
    for a in "${step[@]}"; do out+="$(printf '%q' "$a") "; done
    echo "${out% }"
    local i
    for i in "${!hosts[@]}"; do
      echo
      echo "# ---- node $i: ${hosts[$i]}"
      SLURM_NODEID="$i" SLURMD_NODENAME="${hosts[$i]}" bash "$ROOT/launch/torchrun.sh" --dry-run "${node_args[@]}" -- "${overrides[@]}" \
        || die "node $i: launch/torchrun.sh --dry-run failed"
    done
    exit 0
  fi
  echo "launch/slurm/${VENDOR}.sbatch: job ${SLURM_JOB_ID:-?} on ${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}}" >&2
  run_and_requeue "${step[@]}"
}

# run_and_requeue CMD...: run the srun step; when the trainer stopped on a signal after saving a
# checkpoint (exit status 75: sbatch --signal=USR1@600 before the time limit, or SIGTERM), requeue
# this job, which then resumes from that checkpoint. The status comes from a file that the trainer's
# ranks on this host (node 0, where the batch script runs) write: srun's own status would be the
# highest of all tasks, and a task that srun kills after another one ended counts as 128 + 9.
run_and_requeue() {
  local status_file rc=0
  status_file="$(mktemp "${TMPDIR:-/tmp}/retnet-exit-${SLURM_JOB_ID:-job}.XXXXXX")"
  export RETNET_EXIT_STATUS_FILE="$status_file"
  "$@" || rc=$?
  if [[ "$(cat "$status_file" 2>/dev/null)" == 75 ]]; then
    rm -f "$status_file"
    echo "launch/slurm/${VENDOR}.sbatch: the trainer saved a checkpoint and stopped on a signal (exit 75):" \
      "requeueing job ${SLURM_JOB_ID:-?} to resume" >&2
    # the checkpoint is saved either way: the job ends with the trainer's 75, not the script's 2
    if ! scontrol requeue "${SLURM_JOB_ID:?}"; then
      echo "launch/slurm/${VENDOR}.sbatch: error: scontrol requeue ${SLURM_JOB_ID} failed: submit the same command again to resume" >&2
    fi
    exit 75
  fi
  rm -f "$status_file"
  exit "$rc"
}

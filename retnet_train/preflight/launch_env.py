"""Distributed launch parameters from SLURM variables, without scontrol.

The launch scripts (launch/torchrun.sh, launch/deepspeed.sh, launch/slurm/*.sbatch) call this
module instead of parsing SLURM's hostlist syntax in shell:

    eval "$(python -m retnet_train.preflight.launch_env env --format shell)"
    # -> NNODES NODE_RANK NPROC_PER_NODE WORLD_SIZE MASTER_ADDR MASTER_PORT RDZV_ID

    python -m retnet_train.preflight.launch_env expand 'gpu[001-004,007],cpu1'
    python -m retnet_train.preflight.launch_env hostfile --slots 8      # DeepSpeed hostfile
    python -m retnet_train.preflight.launch_env check-hostfile FILE     # validate one: 'HOST SLOTS' lines

Variables read (explicit settings win over SLURM's):
  MASTER_ADDR      else the first host of SLURM_JOB_NODELIST (SLURM_NODEID 0's node)
  MASTER_PORT      else 10000 + SLURM_JOB_ID % 50000 (two jobs sharing a node get different ports)
  NNODES           else SLURM_JOB_NUM_NODES / SLURM_NNODES, checked against the node list
  NODE_RANK        SLURM_NODEID only (an exported NODE_RANK would leak from the batch host to all tasks)
  NPROC_PER_NODE   else SLURM_GPUS_ON_NODE, else SLURM_GPUS_PER_NODE ("8" or "a100:8")
  WORLD_SIZE       (printed, not read) NNODES x NPROC_PER_NODE where that is set; else the job's
                   SLURM_GPUS (--gpus=12 over 2 nodes may give 8 + 4: each node starts its own count,
                   torchrun's rendezvous adds them up); else NNODES x the GPUs per node
  RDZV_ID          else SLURM_JOB_ID, else "retnet"
This module must stay importable without torch: it runs on every node before anything else.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence


class LaunchEnvError(ValueError):
    """Bad or missing launch variable; the message names the variable."""


# ---------------------------------------------------------------- hostlist expansion


def _split_top_level(text: str, var: str) -> list[str]:
    """Split on commas outside brackets; check brackets balance."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise LaunchEnvError(f"{var}: nested '[' at position {i} in {text!r}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise LaunchEnvError(f"{var}: unmatched ']' at position {i} in {text!r}")
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise LaunchEnvError(f"{var}: unclosed '[' in {text!r}")
    items.append(text[start:])
    return items


_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def _expand_range_list(body: str, var: str, item: str) -> list[str]:
    """'001-004,007' -> ['001', ..., '004', '007'] (zero padding kept, as SLURM does)."""
    out: list[str] = []
    for part in body.split(","):
        m = _RANGE.match(part.strip())
        if not m:
            raise LaunchEnvError(f"{var}: bad range {part!r} in {item!r} (expected N or N-M with digits)")
        lo, hi = m.group(1), m.group(2)
        if hi is None:
            out.append(lo)
            continue
        if int(hi) < int(lo):
            raise LaunchEnvError(f"{var}: descending range {part!r} in {item!r}")
        out.extend(str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + 1))
    return out


def expand_nodelist(nodelist: str, var: str = "SLURM_JOB_NODELIST") -> list[str]:
    """Expand a SLURM hostlist: 'gpu[001-004,007],cpu1' -> gpu001..gpu004, gpu007, cpu1.

    Several bracket groups in one name expand as a product in SLURM's order
    ('r[1-2]n[1-2]' -> r1n1 r1n2 r2n1 r2n2). Order is preserved; duplicates are an error
    (a node cannot appear twice in an allocation).
    """
    if nodelist is None or not nodelist.strip():
        raise LaunchEnvError(f"{var} is empty or unset")
    hosts: list[str] = []
    for item in _split_top_level(nodelist.strip(), var):
        item = item.strip()
        if not item:
            raise LaunchEnvError(f"{var}: empty host name in {nodelist!r}")
        pieces = re.split(r"(\[[^\]]*\])", item)
        expanded = [""]
        for piece in pieces:
            if piece.startswith("["):
                body = piece[1:-1]
                if not body.strip():
                    raise LaunchEnvError(f"{var}: empty brackets in {item!r}")
                choices = _expand_range_list(body, var, item)
            else:
                if re.search(r"\s", piece):
                    raise LaunchEnvError(f"{var}: whitespace inside host name {item!r}")
                choices = [piece]
            expanded = [prefix + c for prefix in expanded for c in choices]
        hosts.extend(expanded)
    seen: set[str] = set()
    for h in hosts:
        if h in seen:
            raise LaunchEnvError(f"{var}: host {h!r} listed twice in {nodelist!r}")
        seen.add(h)
    return hosts


# ---------------------------------------------------------------- launch environment


@dataclass(frozen=True)
class LaunchEnv:
    nnodes: int
    node_rank: int
    nproc_per_node: int
    master_addr: str
    master_port: int
    rdzv_id: str
    hosts: tuple[str, ...]
    world_size: int  # every node's processes: nnodes x nproc_per_node unless nodes have different GPU counts

    def exports(self) -> dict[str, str]:
        return {
            "NNODES": str(self.nnodes),
            "NODE_RANK": str(self.node_rank),
            "NPROC_PER_NODE": str(self.nproc_per_node),
            "WORLD_SIZE": str(self.world_size),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
            "RDZV_ID": self.rdzv_id,
        }


def _int_var(env: Mapping[str, str], name: str, *, minimum: int, maximum: int | None = None) -> int:
    raw = env[name].strip()
    try:
        value = int(raw)
    except ValueError:
        raise LaunchEnvError(f"{name}={env[name]!r} is not an integer") from None
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise LaunchEnvError(f"{name}={value} must be {bound}")
    return value


def _first(env: Mapping[str, str], *names: str) -> str | None:
    for n in names:
        if env.get(n, "").strip():
            return n
    return None


def _gpu_count(env: Mapping[str, str], name: str) -> int | None:
    """A GPU request's count: '8', 'a100:8', 'gpu:mi250x:8' (None when unset)."""
    raw = env.get(name, "").strip()
    if not raw:
        return None
    count = raw.split(",")[0].split(":")[-1].split("(")[0]
    if not count.isdigit() or int(count) < 1:
        raise LaunchEnvError(f"{name}={raw!r}: cannot read a GPU count (expected e.g. '8' or 'a100:8')")
    return int(count)


def _gpus_per_node(env: Mapping[str, str]) -> int | None:
    """SLURM_GPUS_ON_NODE ('8') or SLURM_GPUS_PER_NODE ('8', 'a100:8', 'gpu:mi250x:8')."""
    if env.get("SLURM_GPUS_ON_NODE", "").strip():
        return _int_var(env, "SLURM_GPUS_ON_NODE", minimum=1)
    return _gpu_count(env, "SLURM_GPUS_PER_NODE")


def launch_env_from(
    env: Mapping[str, str], *, nproc_per_node: int | None = None, node_rank: int | None = None
) -> LaunchEnv:
    """Node rank, world size and rendezvous address for this node from a SLURM environment.

    Arguments override the environment (the sbatch dry-run renders every node's view with
    node_rank=i). Raises LaunchEnvError naming the variable that is missing or wrong.
    """
    list_var, hosts = _allocation(env)
    nnodes = _node_count(env, list_var, hosts)
    rank_var, node_rank = _node_rank(env, node_rank, nnodes)
    explicit = nproc_per_node is not None or bool(env.get("NPROC_PER_NODE", "").strip())
    nproc_per_node = _procs_per_node(env, nproc_per_node)
    world_size = nnodes * nproc_per_node if explicit else _job_gpus(env, nnodes, nproc_per_node)
    master_addr = _master_addr(env, hosts, list_var, node_rank, rank_from_slurm=rank_var == "SLURM_NODEID")
    job_id = env.get("SLURM_JOB_ID", "").strip()
    return LaunchEnv(
        nnodes=nnodes,
        node_rank=node_rank,
        nproc_per_node=nproc_per_node,
        master_addr=master_addr,
        master_port=_master_port(env, job_id),
        rdzv_id=_rdzv_id(env, job_id),
        hosts=tuple(hosts),
        world_size=world_size,
    )


def _allocation(env: Mapping[str, str]) -> tuple[str, list[str]]:
    """The node list's variable and its hosts."""
    list_var = _first(env, "SLURM_JOB_NODELIST", "SLURM_NODELIST")
    if list_var is None:
        raise LaunchEnvError(
            "SLURM_JOB_NODELIST is unset: not inside a SLURM allocation "
            "(run under sbatch/salloc, or launch with launch/torchrun.sh --nnodes ...)"
        )
    return list_var, expand_nodelist(env[list_var], list_var)


def _node_count(env: Mapping[str, str], list_var: str, hosts: list[str]) -> int:
    nn_var = _first(env, "NNODES", "SLURM_JOB_NUM_NODES", "SLURM_NNODES")
    nnodes = _int_var(env, nn_var, minimum=1) if nn_var else len(hosts)
    if nnodes != len(hosts):
        raise LaunchEnvError(f"{nn_var}={nnodes} but {list_var}={env[list_var]!r} lists {len(hosts)} hosts")
    return nnodes


def _node_rank(env: Mapping[str, str], node_rank: int | None, nnodes: int) -> tuple[str, int]:
    """(where the rank came from, the rank): the argument, else SLURM_NODEID."""
    if node_rank is None:
        # Only SLURM_NODEID: an exported NODE_RANK from the batch host would reach every srun task.
        rank_var = _first(env, "SLURM_NODEID")
        if rank_var is None:
            raise LaunchEnvError("SLURM_NODEID is unset: run the per-node command inside `srun`")
        node_rank = _int_var(env, rank_var, minimum=0)
    else:
        rank_var = "node_rank"
    if not 0 <= node_rank < nnodes:
        raise LaunchEnvError(f"{rank_var}={node_rank} is out of range for {nnodes} node(s)")
    return rank_var, node_rank


def _procs_per_node(env: Mapping[str, str], nproc_per_node: int | None) -> int:
    """The argument, else NPROC_PER_NODE, else the node's GPU count."""
    if nproc_per_node is not None:
        if nproc_per_node < 1:
            raise LaunchEnvError(f"nproc_per_node={nproc_per_node} must be >= 1")
        return nproc_per_node
    if env.get("NPROC_PER_NODE", "").strip():
        return _int_var(env, "NPROC_PER_NODE", minimum=1)
    gpus = _gpus_per_node(env)
    if gpus is None:
        raise LaunchEnvError(
            "NPROC_PER_NODE is unset and SLURM_GPUS_ON_NODE / SLURM_GPUS_PER_NODE give no "
            "GPU count: request GPUs (--gpus-per-node=8) or set NPROC_PER_NODE"
        )
    return gpus


def _job_gpus(env: Mapping[str, str], nnodes: int, on_this_node: int) -> int:
    """The job's GPUs: SLURM_GPUS (--gpus=N, which SLURM may spread unevenly), else nodes x this node's."""
    total = _gpu_count(env, "SLURM_GPUS")
    if total is None or env.get("SLURM_GPUS_PER_NODE", "").strip():
        return nnodes * on_this_node
    if total < nnodes:
        raise LaunchEnvError(f"SLURM_GPUS={total} GPUs cannot give each of the {nnodes} nodes one")
    if on_this_node > total:
        raise LaunchEnvError(f"SLURM_GPUS_ON_NODE={on_this_node} but the job has SLURM_GPUS={total}")
    return total


def _master_addr(
    env: Mapping[str, str], hosts: list[str], list_var: str, node_rank: int, *, rank_from_slurm: bool
) -> str:
    """MASTER_ADDR, else the first host; then this node must sit at its rank in the list, or node 0
    would not be the first host."""
    if env.get("MASTER_ADDR", "").strip():
        return env["MASTER_ADDR"].strip()
    here = env.get("SLURMD_NODENAME", "").strip()
    if here and rank_from_slurm and hosts[node_rank] != here:
        raise LaunchEnvError(
            f"SLURMD_NODENAME={here!r} but {list_var} puts {hosts[node_rank]!r} at "
            f"SLURM_NODEID={node_rank}: node list order is not what this helper assumes; "
            f"set MASTER_ADDR to node 0's address"
        )
    return hosts[0]


def _master_port(env: Mapping[str, str], job_id: str) -> int:
    """MASTER_PORT, else one per job id (two jobs sharing a node), else torchrun's default."""
    if env.get("MASTER_PORT", "").strip():
        return _int_var(env, "MASTER_PORT", minimum=1, maximum=65535)
    if not job_id:
        return 29500
    if not job_id.isdigit():
        raise LaunchEnvError(f"SLURM_JOB_ID={job_id!r} is not an integer (set MASTER_PORT)")
    return 10000 + int(job_id) % 50000


def _rdzv_id(env: Mapping[str, str], job_id: str) -> str:
    rdzv_id = env.get("RDZV_ID", "").strip() or job_id or "retnet"
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", rdzv_id):
        raise LaunchEnvError(f"RDZV_ID={rdzv_id!r} may only contain letters, digits, '_', '.', '-'")
    return rdzv_id


def hostfile_lines(env: Mapping[str, str], slots: int) -> list[str]:
    """DeepSpeed hostfile ('host slots=N') for the allocation's nodes."""
    if slots < 1:
        raise LaunchEnvError(f"--slots={slots} must be >= 1")
    list_var = _first(env, "SLURM_JOB_NODELIST", "SLURM_NODELIST")
    if list_var is None:
        raise LaunchEnvError("SLURM_JOB_NODELIST is unset: not inside a SLURM allocation")
    return [f"{h} slots={slots}" for h in expand_nodelist(env[list_var], list_var)]


def read_hostfile(path: str) -> list[tuple[str, int]]:
    """Parse and check a DeepSpeed/MPI hostfile ('host slots=N' a line, '#' comments).

    DeepSpeed's runner silently falls back to the local node when the hostfile is missing, and
    reports malformed lines late; this fails first, naming the file and line.
    """
    try:
        with open(path) as f:
            text = f.read()
    except OSError as exc:
        raise LaunchEnvError(f"--hostfile {path}: {exc.strerror or exc}") from None
    out: list[tuple[str, int]] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"(\S+)\s+slots=(\d+)(?:\s.*)?", line)  # further fields: DeepSpeed ignores them
        if not m or int(m.group(2)) < 1:
            raise LaunchEnvError(
                f"--hostfile {path}:{lineno}: expected 'HOST slots=N' with N >= 1, got {raw.strip()!r}"
            )
        if any(h == m.group(1) for h, _ in out):
            raise LaunchEnvError(f"--hostfile {path}:{lineno}: host {m.group(1)!r} listed twice")
        out.append((m.group(1), int(m.group(2))))
    if not out:
        raise LaunchEnvError(f"--hostfile {path}: no hosts in it")
    return out


# ---------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    import os

    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog="python -m retnet_train.preflight.launch_env", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_env = sub.add_parser("env", help="print this node's launch variables")
    p_env.add_argument("--format", choices=("shell", "json"), default="shell")
    p_env.add_argument("--nproc-per-node", type=int, default=None)
    p_env.add_argument("--node-rank", type=int, default=None, help="render another node's view (dry runs)")
    p_exp = sub.add_parser("expand", help="expand a SLURM hostlist, one host a line")
    p_exp.add_argument("nodelist")
    p_hf = sub.add_parser("hostfile", help="DeepSpeed hostfile for SLURM_JOB_NODELIST")
    p_hf.add_argument("--slots", type=int, required=True, help="GPUs per node")
    p_chk = sub.add_parser("check-hostfile", help="validate a hostfile; print 'HOST SLOTS' a line")
    p_chk.add_argument("path")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "expand":
            print("\n".join(expand_nodelist(args.nodelist, "nodelist")))
        elif args.cmd == "check-hostfile":
            print("\n".join(f"{h} {n}" for h, n in read_hostfile(args.path)))
        elif args.cmd == "hostfile":
            print("\n".join(hostfile_lines(environ, args.slots)))
        else:
            le = launch_env_from(environ, nproc_per_node=args.nproc_per_node, node_rank=args.node_rank)
            if args.format == "json":
                print(json.dumps(asdict(le)))
            else:
                for k, v in le.exports().items():
                    print(f"export {k}={shlex.quote(v)}")
    except LaunchEnvError as exc:
        print(f"launch_env: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The trainer's view for the preflight: the parameter count (from --params, a model preset or the
composed trainer config) and the checkpoint directory, batch arithmetic and data paths the trainer
itself will use, from the same Hydra overrides. The preflight composes the config exactly as
`python -m retnet_train.train` would, so it checks the directory the trainer will really write to
and fails on values the trainer would only reject after the queue wait."""

from __future__ import annotations

import argparse
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

REPO_ROOT = Path(__file__).resolve().parents[2]


class PreflightError(ValueError):
    """Bad argument or input file; the message names it."""


def params_from_preset(path: str | Path) -> int:
    """Exact parameter count of a model preset YAML (built on the meta device: no memory)."""
    path = Path(path)
    if not path.is_file():
        raise PreflightError(f"--model-preset {path}: no such file")
    import yaml

    try:
        preset = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise PreflightError(f"--model-preset {path}: not valid YAML ({exc})") from None
    if not isinstance(preset, dict):
        raise PreflightError(f"--model-preset {path}: expected a mapping of model fields, got {type(preset).__name__}")
    try:
        return _count_params(preset)
    except (ValueError, TypeError, KeyError) as exc:
        raise PreflightError(f"--model-preset {path}: {exc} (pass --params N instead)") from None


def _count_params(preset: dict) -> int:
    import torch

    from retnet_train.model import build_model, model_config_from_dict

    with torch.device("meta"):
        model = build_model(model_config_from_dict(preset))  # validated there
    return int(sum(p.numel() for p in model.parameters()))


def parse_params(text: str) -> int:
    try:
        value = float(text)
    except ValueError:
        raise PreflightError(f"--params {text!r}: not a number (e.g. 1.3e9)") from None
    if not value >= 1 or value != value or value == float("inf"):
        raise PreflightError(f"--params {text!r}: must be a positive parameter count")
    return int(value)


def resolve_params(args: argparse.Namespace) -> tuple[int | None, str]:
    if args.params is not None:
        return parse_params(args.params), "--params"
    if args.model_preset is not None:
        return params_from_preset(args.model_preset), args.model_preset
    name = override_value(args.overrides, "model")
    if name:
        preset = REPO_ROOT / "configs" / "model" / f"{name}.yaml"
        if not preset.is_file():
            raise PreflightError(f"override model={name}: no preset {preset} (pass --params N)")
        return params_from_preset(preset), f"configs/model/{name}.yaml"
    return None, ""


def override_value(overrides: Sequence[str], key: str) -> str | None:
    """The value of `key=V` (or +key=V, ++key=V) among Hydra overrides; the last one wins."""
    found = None
    for o in overrides:
        m = re.match(r"^\+{0,2}([A-Za-z0-9_./@-]+)=(.*)$", o)
        if m and m.group(1) == key:
            found = m.group(2)
    return found


# ---------------------------------------------------------------- the trainer's config


@dataclass
class TrainerView:
    """What the preflight needs from the trainer's composed Hydra config."""

    checkpoint_dir: Path
    keep: int  # checkpoints on disk at once while a new one is written: keep_last + 1
    params: int
    precision: str
    device: str
    problems: list[str]  # config values the trainer would reject (each names its key)


def compose_trainer_config(overrides: Sequence[str]):
    """The trainer's config for these overrides, composed as `python -m retnet_train.train` would.

    None when this checkout has no trainer config (configs/config.yaml) or schema module.
    A bad override raises PreflightError with Hydra's message.
    """
    if not (REPO_ROOT / "configs" / "config.yaml").is_file():
        return None
    try:
        from hydra import compose, initialize_config_dir
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        from retnet_train.components import config as schema
    except ImportError as exc:
        raise PreflightError(
            f"cannot compose the trainer config: {exc} (install the project: pip install -e .; or pass --no-config)"
        ) from None
    schema.register()
    try:
        with initialize_config_dir(config_dir=str(REPO_ROOT / "configs"), version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PreflightError(f"Hydra overrides {' '.join(overrides) or '(none)'}: {msg}") from None


def trainer_view(cfg, world_size: int | None, node_rank: int = 0) -> TrainerView:
    """Checkpoint dir, size inputs and the value checks the trainer runs at start (on node `node_rank`)."""
    from retnet_train.components import config as schema
    from retnet_train.components.loaders import missing_data_paths
    from retnet_train.components.typed_config import typed_config

    try:
        cfg = typed_config(cfg)  # typed and resolved, as the trainer's entry point does
    except Exception as exc:  # noqa: BLE001 - omegaconf raises several types
        raise PreflightError(f"trainer config: {str(exc).strip().splitlines()[0]}") from None
    try:
        params = _count_params(dict(cfg.model))
    except (ValueError, TypeError, KeyError) as exc:
        raise PreflightError(f"model config: {exc}") from None
    missing = missing_data_paths(cfg.data.paths)  # as the trainer names them
    values = _values_problem(schema, cfg)
    problems = [values] if values else []
    problems += _world_problems(schema, cfg, world_size, values) + missing + _start_problems(cfg, node_rank, world_size)
    # a bad data.* / train.* value or a missing path: the data checks would repeat that problem
    if not missing and not (values or "").startswith(("data.", "train.")):
        problems += _data_problems(cfg, world_size)
    return TrainerView(
        checkpoint_dir=Path(schema.checkpoint_dir(cfg)),
        keep=int(cfg.checkpoint.keep_last) + 1,
        params=params,
        precision=str(cfg.deepspeed.precision),
        device=str(cfg.train.device),
        problems=problems,
    )


def _values_problem(schema, cfg) -> str | None:
    """What the trainer's value checks would reject first (None: they pass)."""
    if hasattr(schema, "check_values"):
        try:
            schema.check_values(cfg)
        except ValueError as exc:
            return str(exc)
    return None


def _world_problems(schema, cfg, world_size: int | None, values: str | None = None) -> list[str]:
    """What the batch arithmetic and the profiled ranks would reject for this world size. Without one (no
    --nproc-per-node), the batch is checked for one data-parallel rank: what fails there fails at every size.
    After a refused data.*, train.* or parallel.* value (`values`) the batch is not: that value is named
    already, and a seq_len or micro-batch of 0 would divide by zero."""
    problems: list[str] = []
    batch_values_ok = not (values or "").startswith(("data.", "train.", "parallel."))
    if batch_values_ok and hasattr(schema, "grad_accumulation"):
        world = world_size or cfg.parallel.context_parallel_size
        try:
            schema.grad_accumulation(cfg, world)
        except ValueError as exc:
            where = f"world size {world_size}" if world_size else "at any world size; --nproc-per-node checks this one"
            problems.append(f"{exc} ({where})")
    if world_size is not None and cfg.profile.enabled:
        from retnet_train.components.profiling import check_profile_ranks

        try:
            check_profile_ranks(cfg.profile.ranks, world_size)
        except ValueError as exc:
            problems.append(str(exc))
    return problems


def _data_problems(cfg, world_size: int | None) -> list[str]:
    """What the trainer's loaders refuse, read from the manifests (no shard is opened): data.tokenizer or
    the model's vocab_size against the manifests, a source shorter than data.seq_len, a validation split
    missing or too small for the data-parallel ranks, a manifest that is not valid."""
    from retnet_train.components.loaders import check_data
    from retnet_train.model import model_config_from_dict

    cp = cfg.parallel.context_parallel_size
    dp_world = world_size // cp if world_size and world_size % cp == 0 else 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # sources left out of validation: the trainer says which
            check_data(cfg, model_config_from_dict(dict(cfg.model)).vocab_size, dp_world)
    except (ValueError, OSError) as exc:
        return [str(exc)]
    return []


def _start_problems(cfg, node_rank: int, world_size: int | None = None) -> list[str]:
    """What the trainer refuses at start besides the config values and the data (_data_problems): fp16 or a
    GPU retention backend on CPU, a run.dir it cannot write (on node 0: rank 0 alone writes there), the
    checkpoint that train.resume names (or a resume=never over checkpoints) and a resume of it under this
    layout and model (_resume_problems), a train.init_weights that is not there."""
    from retnet_train.components.checkpoint import CheckpointManager
    from retnet_train.components.config import checkpoint_dir, resolved_config
    from retnet_train.components.distributed import backend_problem, precision_problem
    from retnet_train.components.resume_source import resolve_resume
    from retnet_train.components.run_dir import DirLock, write_problem

    problem = write_problem("run.dir", cfg.run.dir) if node_rank == 0 else None
    device_problems = (
        precision_problem(cfg.train.device, cfg.deepspeed.precision),
        backend_problem(cfg.train.device, cfg.model.get("retention_backend")),
    )
    problems = [p for p in (problem, *device_problems) if p]
    if node_rank == 0:  # a live trainer's lock (rank 0 takes it on node 0)
        locks = (DirLock(cfg.run.dir, "run.dir"), DirLock(checkpoint_dir(cfg), "checkpoint.dir"))
        problems += [p for p in dict.fromkeys(lock.probe() for lock in locks) if p]
    manager = CheckpointManager(checkpoint_dir(cfg), cfg.checkpoint.keep_last, None)  # None: prints nothing
    try:
        source = resolve_resume(cfg.train.resume, manager, resolved_config(cfg))
    except ValueError as exc:
        problems.append(str(exc))
    else:
        problems += _resume_problems(cfg, source, world_size) if source else []
    weights = cfg.train.init_weights
    if weights and not os.path.exists(weights):
        problems.append(f"train.init_weights={weights}: no such file or directory (from {os.getcwd()})")
    return problems


def _resume_problems(cfg, source: tuple, world_size: int | None) -> list[str]:
    """What the trainer's resume plan refuses for the checkpoint it will resume (reshard.plan): another ZeRO
    stage or precision it cannot convert, model settings that change what the weights compute, a conversion
    into a directory it cannot write, a model-states file torch cannot read (named as the trainer names it).
    Without a world size, the checkpoint's own is assumed."""
    from retnet_train.components.checkpoint_discovery import read_model_states
    from retnet_train.components.reshard import checkpoint_layout, plan, run_layout

    path = os.path.join(*source)
    try:
        state = read_model_states(path)  # read once: the layout and the plan both need it
    except ValueError as exc:  # damaged where the checks that chose it do not look: the file and what it shows
        return [f"train.resume: {exc}"]
    except OSError as exc:  # a file that looks whole but cannot be opened (permissions, a mount gone)
        return [f"train.resume: {path}: cannot be read ({exc})"]
    world = world_size or checkpoint_layout(path, state)["world_size"]
    try:
        groups = cfg.optim.no_decay_embeddings
        plan(source[0], source[1], run_layout(cfg, world), dict(cfg.model), state=state, no_decay_embeddings=groups)
    except ValueError as exc:
        return [str(exc)]
    return []


# ---------------------------------------------------------------- overrides


_HYDRA_VALUE_FLAGS = {
    "-c",
    "--cfg",
    "-p",
    "--package",
    "-cp",
    "--config-path",
    "-cn",
    "--config-name",
    "-cd",
    "--config-dir",
    "--experimental-rerun",
}


def hydra_overrides(args: Sequence[str]) -> list[str]:
    """The overrides among a trainer command line (drops Hydra flags such as `--cfg job`, `-m`)."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a in _HYDRA_VALUE_FLAGS:
            skip = True
        elif not a.startswith("-"):
            out.append(a)
    return out

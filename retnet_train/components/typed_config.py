"""The composed Hydra config as the typed TrainConfig, once, at the entry point: unknown keys refused
(with the closest known one), `~` in path keys expanded."""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing

from .config import TrainConfig


def typed_config(cfg) -> TrainConfig:
    """The composed Hydra config as a TrainConfig. Hydra's `+key=value` (which Hydra itself suggests
    for a misspelled key) adds keys the schema lacks, and the conversion would drop them silently: an
    unknown key is refused here, named, as Hydra refuses a misspelled key without the `+`."""
    from omegaconf import OmegaConf

    unknown = unknown_keys(OmegaConf.to_container(cfg, resolve=False), TrainConfig)
    if unknown:
        also = f" (also unknown: {', '.join(unknown[1:4])})" if unknown[1:] else ""
        close = closest_key(unknown[0], TrainConfig)
        hint = f"; did you mean {close}?" if close else ""
        raise ValueError(
            f"{unknown[0]}: not a key of the trainer config (retnet_train/components/config.py); "
            f"nothing would read it{hint}{also}"
        )
    return expand_home(OmegaConf.to_object(cfg))


def expand_home(cfg: TrainConfig) -> TrainConfig:
    """`~` in the path keys means the home directory, as in a shell: the shell leaves `key=~/x` alone,
    and the run would otherwise create a directory named `~` in the working directory."""
    expand = os.path.expanduser
    cfg.run.dir = expand(cfg.run.dir)
    cfg.checkpoint.dir = expand(cfg.checkpoint.dir) if cfg.checkpoint.dir else cfg.checkpoint.dir
    cfg.data.paths = [expand(p) for p in cfg.data.paths]
    cfg.data.tokenizer = expand(cfg.data.tokenizer) if cfg.data.tokenizer else cfg.data.tokenizer
    if cfg.train.resume not in ("auto", "never"):
        cfg.train.resume = expand(cfg.train.resume)
    cfg.train.init_weights = expand(cfg.train.init_weights) if cfg.train.init_weights else cfg.train.init_weights
    return cfg


def closest_key(dotted: str, schema) -> str | None:
    """The schema's key most like an unknown dotted key, at the level where it stops matching, or None."""
    *known, last = dotted.split(".")
    for part in known:
        schema = typing.get_type_hints(schema)[part]
    match = difflib.get_close_matches(last, list(typing.get_type_hints(schema)), n=1, cutoff=0.6)
    return ".".join(known + match) if match else None


def unknown_keys(values: dict, schema, prefix: str = "") -> list:
    """Dotted keys of `values` that the dataclass `schema` (nested) does not have."""
    types = typing.get_type_hints(schema)
    out = []
    for key, value in values.items():
        if key not in types:
            out.append(f"{prefix}{key}")
        elif dataclasses.is_dataclass(types[key]) and isinstance(value, dict):
            out += unknown_keys(value, types[key], f"{prefix}{key}.")
    return out

"""The presets against the RetNet paper's model sizes and recipe, and against what their own comments state."""

import math
import re
from pathlib import Path

import pytest
import torch
import yaml

from retnet_train.model import build_model, model_config_from_dict
from retnet_train.model.retnet import decay_log_gammas

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
MODEL_PRESETS = sorted((CONFIGS / "model").glob("*.yaml"))
# the paper's recipe at a sequence length: {name: seq_len} of the *_8k and *_32k experiments
RECIPE_EXPERIMENTS = {
    p.stem: int(p.stem.rsplit("_", 1)[1][:-1]) * 1024
    for pattern in ("*_8k.yaml", "*_32k.yaml")
    for p in (CONFIGS / "experiment").glob(pattern)
}

# The paper's sizes (d_model, layers, heads at key head dim 256; value dim and FFN 2 d_model): 1.3B-6.7B from its
# language-modeling runs, 13B from its training-cost table; and the learning rate of each language-modeling run.
PAPER = {"1.3b": (2048, 24, 8), "2.7b": (2560, 32, 10), "6.7b": (4096, 32, 16), "13b": (5120, 40, 20)}
PAPER_LR = {"1.3b": 6e-4, "2.7b": 3e-4, "6.7b": 3e-4}


def load(path):
    return model_config_from_dict(yaml.safe_load(Path(path).read_text()))


@pytest.mark.parametrize("size", PAPER)
def test_retnet_presets_have_the_paper_sizes(size):
    d, layers, heads = PAPER[size]
    for family in ("", "retnet_fla_"):
        cfg = load(CONFIGS / "model" / f"{family}{size}.yaml")
        shape = (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.key_head_dim, cfg.value_dim)
        assert shape == (d, layers, heads, 256, 2 * d)
    paper = load(CONFIGS / "model" / f"{size}.yaml")
    assert (paper.ffn_dim, paper.ffn_type, paper.activation, paper.norm) == (2 * d, "mlp", "gelu", "layernorm")


def test_each_head_decays_at_one_minus_two_to_the_minus_five_minus_h():
    h = torch.arange(20, dtype=torch.float64)
    torch.testing.assert_close(decay_log_gammas(20).double(), torch.log(1 - 2 ** (-5 - h)), rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", sorted(RECIPE_EXPERIMENTS))
def test_recipe_experiments_follow_the_paper_recipe(name):
    """What docs/training.md says the *_8k and *_32k experiments are: the paper's batch, steps, schedule,
    optimizer and learning rate per size, at the sequence length of their name in bf16, on the model of
    their name."""
    cfg = compose(name)
    arch, size = re.fullmatch(r"(retnet|transformer)_(.+)_\d+k", name).groups()
    assert cfg.optim.lr == PAPER_LR[size]
    assert (cfg.train.global_batch_tokens, cfg.train.max_steps) == (4 * 2**20, 25_000)
    assert (cfg.optim.warmup_steps, cfg.optim.decay, cfg.optim.min_lr_ratio) == (375, "linear", 0.0)
    assert (cfg.optim.betas, cfg.optim.weight_decay) == ([0.9, 0.98], 0.05)
    assert (cfg.data.seq_len, cfg.deepspeed.precision) == (RECIPE_EXPERIMENTS[name], "bf16")
    model = model_config_from_dict(cfg.model)
    assert (model.arch, model.d_model, model.n_layers) == (arch, *PAPER[size][:2])


@pytest.mark.parametrize(
    "name",
    sorted(
        n
        for n in RECIPE_EXPERIMENTS
        if n.startswith("retnet_") and f"transformer_{n[len('retnet_') :]}" in RECIPE_EXPERIMENTS
    ),
)
def test_transformer_twins_differ_in_the_model_only(name):
    """transformer_X runs what retnet_X runs (data, batch, optimizer, budget) on the Transformer: besides the
    model and the run's name only RetNet's selective recomputation, which the Transformer has no core for."""
    from dataclasses import asdict

    retnet, twin = asdict(compose(name)), asdict(compose(f"transformer_{name[len('retnet_') :]}"))
    modes = [cfg["train"].pop("activation_checkpointing") for cfg in (retnet, twin)]
    for cfg in (retnet, twin):
        del cfg["model"], cfg["run"]["name"], cfg["run"]["dir"], cfg["wandb"]["tags"]
    assert retnet == twin
    assert modes[1] == "none" and modes[0] in ("none", "selective")


def compose(name):
    from omegaconf import OmegaConf

    from retnet_train.preflight import compose_trainer_config

    return OmegaConf.to_object(compose_trainer_config([f"experiment={name}"]))


def header(path):
    """A preset's comment lines, joined into one text."""
    return " ".join(line.lstrip("# ").rstrip() for line in path.read_text().splitlines() if line.startswith("#"))


@pytest.mark.parametrize("path", MODEL_PRESETS, ids=lambda p: p.stem)
def test_what_a_model_preset_comment_states_holds(path):
    """Head dims, head counts, value and FFN widths, parameters per block and in all that a preset's comment
    names are those of its values (a comment giving a key head dim of 256 where d_model / n_heads is 64 fails here)."""
    cfg, text = load(path), header(path)
    d = cfg.d_model
    head_dim = cfg.key_head_dim if cfg.arch == "retnet" else cfg.head_dim
    for m in re.finditer(r"head dim (?:d / heads: )?(\d+)", text):
        assert int(m.group(1)) == head_dim, (m.group(0), head_dim)
    for m in re.finditer(r"\((\d+) heads\)", text):
        assert int(m.group(1)) == cfg.n_heads, m.group(0)
    for m in re.finditer(r"value dim (\d+)d\b", text):
        assert cfg.value_dim == int(m.group(1)) * d, m.group(0)
    for m in re.finditer(r"FFN (\d+)d\b", text):
        assert (cfg.ffn_type, cfg.ffn_dim) == ("mlp", int(m.group(1)) * d), m.group(0)
    for m in re.finditer(r"ffn_dim = (\d+)d/3 rounded up to a multiple of (\d+)", text):
        multiple = int(m.group(2))
        assert cfg.ffn_dim == multiple * math.ceil(int(m.group(1)) * d / 3 / multiple), m.group(0)
    with torch.device("meta"):
        model = build_model(cfg)
    block = sum(p.numel() for p in model.layers[0].parameters() if p.dim() == 2)
    for m in re.finditer(r"(\d+) d\^2 per block|block has ~(\d+) d\^2 parameters", text):
        per_block = int(m.group(1) or m.group(2)) * d * d
        assert abs(block / per_block - 1) <= (0.1 if m.group(2) else 0), (m.group(0), block / d**2)
    for m in re.finditer(r"(\d+(?:\.\d+)?)([MB]) parameters", text):
        stated, decimals = float(m.group(1)), len(m.group(1).partition(".")[2])
        assert round(model.num_params() / {"M": 1e6, "B": 1e9}[m.group(2)], decimals) == stated, m.group(0)

"""Rank 0's start banner and the warnings printed under it."""

from retnet_train.components.banner import start_banner
from retnet_train.components.config import TrainConfig


def banner(**optim_and_train) -> list:
    cfg = TrainConfig()
    cfg.optim.warmup_steps = optim_and_train.get("warmup_steps", cfg.optim.warmup_steps)
    cfg.train.max_steps = optim_and_train.get("max_steps", cfg.train.max_steps)
    return start_banner(cfg, 1, 1, 1, 2048, 1000, "cpu").splitlines()


def test_warmup_longer_than_the_run_is_one_warning_naming_both_keys():
    lines = banner(warmup_steps=30, max_steps=6)
    assert len(lines) == 2 and lines[0].startswith("world 1 | ")
    assert lines[1] == (
        "warning: optim.warmup_steps=30 > train.max_steps=6: the learning rate never reaches optim.lr; "
        "the last step updates with 0.2 x optim.lr and nothing decays"
    )


def test_no_warning_when_the_warmup_ends_within_the_run():
    assert len(banner(warmup_steps=6, max_steps=6)) == 1
    assert len(banner(warmup_steps=0, max_steps=1)) == 1

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


def test_a_gpu_sized_batch_on_cpu_is_one_warning_naming_the_key():
    cfg = TrainConfig()  # the schema's defaults: 4M tokens per step, as a bare command on CPU gets them
    lines = start_banner(cfg, 1, 1, 16_384, 4 * 2**20, 1000, "cpu").splitlines()
    assert lines[1:] == [
        "warning: 4,194,304 tokens per optimizer step (16,384 micro-batches) on CPU: a step takes hours, and "
        "SIGTERM / SIGUSR1 stop the run only at a step's end; set train.global_batch_tokens "
        "(experiment=tiny_cpu: 2,048)"
    ]
    assert len(start_banner(cfg, 1, 1, 16_384, 4 * 2**20, 1000, "cuda").splitlines()) == 1
    assert len(start_banner(cfg, 1, 1, 1, 2048, 1000, "cpu").splitlines()) == 1


def test_tokens_total_counts_the_resumed_steps_at_their_own_batch_size():
    """Resumed at step 12 after 3,072 tokens (256 per step), on at 512 per step to step 14: 4,096 in all,
    not 14 x 512."""
    cfg = TrainConfig()
    cfg.train.max_steps = 14
    assert "| 7,168 tokens total |" in start_banner(cfg, 1, 1, 4, 512, 1000, "cpu")
    assert "| 4,096 tokens total |" in start_banner(cfg, 1, 1, 4, 512, 1000, "cpu", resumed_at=(12, 3072))
    assert "| 3,072 tokens total |" in start_banner(cfg, 1, 1, 4, 512, 1000, "cpu", resumed_at=(20, 3072))

"""check_values: every value the type system cannot reject fails with the message naming its key; the
sections are checked in order, so the first bad one is reported. checkpoint_dir: the trainer's rule."""

import pytest

from retnet_train.components.config import TrainConfig, check_values, checkpoint_dir


def valid() -> TrainConfig:
    cfg = TrainConfig()
    cfg.data.paths = ["/d/web"]
    return cfg


def with_values(**values) -> TrainConfig:
    """A valid config with `section__key=value` changes."""
    cfg = valid()
    for name, value in values.items():
        section, key = name.split("__")
        setattr(getattr(cfg, section), key, value)
    return cfg


@pytest.mark.parametrize(
    "values, message",
    [
        (dict(data__paths=[]), "data.paths: no data configured"),
        (dict(data__weights=[0.5, 0.5]), "data.weights: 2 weights for 1 paths"),
        (dict(data__weights=[0.0]), "data.weights: must all be > 0"),
        (dict(data__weights=[-1.0]), "data.weights: must all be > 0"),
        # inf: the loader refused it once the model was built, naming the source but not data.weights
        (dict(data__weights=[float("inf")]), "data.weights: inf is not a finite number"),
        (
            dict(data__weights=[1.0, float("nan")], data__paths=["/d/a", "/d/b"]),
            "data.weights: nan is not a finite number",
        ),
        (dict(data__seq_len=0), "data.seq_len: must be > 0"),
        (dict(data__on_change="continue"), "data.on_change: 'continue' is not refuse|switch"),
        (dict(optim__lr=0.0), "optim.lr: must be > 0"),
        (dict(optim__betas=[0.9, 1.0]), "optim.betas: two values in [0, 1)"),
        (dict(optim__decay="step"), "optim.decay: 'step' is not linear|cosine|sqrt|constant"),
        (dict(optim__decay_fraction=0.0), "optim.decay_fraction: 0.0 is not in (0, 1] (or null)"),
        (dict(optim__decay_fraction=1.5), "optim.decay_fraction: 1.5 is not in (0, 1] (or null)"),
        (
            dict(optim__decay="constant", optim__decay_fraction=0.2),
            "optim.decay_fraction: optim.decay=constant does not decay",
        ),
        (dict(optim__warmup_steps=-1), "optim.warmup_steps: must be >= 0"),
        (dict(optim__eps=0.0), "optim.eps: must be > 0"),
        (dict(optim__weight_decay=-0.1), "optim.weight_decay: must be >= 0"),
        (dict(optim__grad_clip=-1.0), "optim.grad_clip: must be >= 0 (0: no clipping)"),
        (dict(optim__min_lr_ratio=1.5), "optim.min_lr_ratio: must be in [0, 1]"),
        # inf passes a range check: NaN weights (lr, weight_decay) or no update (eps), silently
        (dict(optim__lr=float("inf")), "optim.lr: inf is not a finite number"),
        (dict(optim__eps=float("inf")), "optim.eps: inf is not a finite number"),
        (dict(optim__weight_decay=float("inf")), "optim.weight_decay: inf is not a finite number"),
        (dict(deepspeed__zero_stage=4), "deepspeed.zero_stage: 4 is not 0-3"),
        (dict(deepspeed__precision="int8"), "deepspeed.precision: 'int8' is not bf16|bf16-mixed|fp16|fp32"),
        (dict(deepspeed__offload_param=True), "deepspeed.offload_param: needs zero_stage=3"),
        (
            dict(deepspeed__offload_optimizer=True, deepspeed__zero_stage=0),
            "deepspeed.offload_optimizer: needs zero_stage>=1",
        ),
        (
            dict(deepspeed__grad_accum_dtype="fp16"),
            "deepspeed.grad_accum_dtype: 'fp16' is not fp32 (or null: the dtype of deepspeed.precision)",
        ),
        # DeepSpeed refused these only once the model was built: pydantic's or an assert's lines, naming its own field
        (dict(deepspeed__reduce_bucket_size=0), "deepspeed.reduce_bucket_size: must be > 0"),
        (dict(deepspeed__allgather_bucket_size=-1), "deepspeed.allgather_bucket_size: must be >= 0"),
        (
            dict(deepspeed__allgather_bucket_size=123_456_789),
            "deepspeed.allgather_bucket_size: 123456789 is odd; ZeRO 1 and 2 need a multiple of 2 (DeepSpeed "
            "aligns its all-gather buffers to 4 bytes)",
        ),
        (dict(train__micro_batch_size=0), "train.micro_batch_size: must be > 0"),
        # torch.manual_seed's range: beyond it the run stopped with 'Overflow when unpacking long long'
        (dict(train__seed=2**70), f"train.seed: {2**70} is not in [-2^63, 2^63)"),
        (dict(train__seed=-(2**63) - 1), f"train.seed: {-(2**63) - 1} is not in [-2^63, 2^63)"),
        (dict(train__max_consecutive_nonfinite=0), "train.max_consecutive_nonfinite: must be > 0"),
        (dict(train__eval_interval=-1), "train.eval_interval: must be >= 0 (0: no validation)"),
        (
            dict(train__activation_checkpointing="partial"),
            "train.activation_checkpointing: 'partial' is not one of none, selective, full",
        ),
        (
            dict(train__activation_memory_budget=0.0, train__compile=True),
            "train.activation_memory_budget: 0.0 is not in (0, 1]",
        ),
        (
            dict(train__activation_memory_budget=0.5),
            "train.activation_memory_budget: 0.5 needs train.compile=true: torch.compile's partitioner does "
            "the recomputing",
        ),
        (dict(train__device="tpu"), "train.device: 'tpu' is not auto|cpu|cuda"),
        (dict(train__peak_flops=0.0), "train.peak_flops: must be > 0 (or null)"),
        (dict(train__peak_flops=float("inf")), "train.peak_flops: inf is not a finite number"),  # MFU 0
        (
            dict(parallel__context_parallel_size=3),
            "parallel.context_parallel_size=3 does not divide data.seq_len=2048: each rank holds seq_len / 3 tokens",
        ),
        (dict(run__dir=""), "run.dir: must name a directory (empty: the run would write into the current one)"),
        (dict(checkpoint__interval=0), "checkpoint.interval: must be > 0"),
        (dict(checkpoint__keep_last=0), "checkpoint.keep_last: must be >= 1"),
        (dict(profile__start_step=0), "profile.start_step: must be >= 1 (optimizer steps count from 1)"),
        (dict(profile__steps=0), "profile.steps: must be >= 1"),
        (
            dict(profile__enabled=True, profile__start_step=30_000),
            "profile.start_step: 30000 is beyond train.max_steps=25000: nothing would be profiled",
        ),
        (dict(wandb__mode="on"), "wandb.mode: 'on' is not online|offline|disabled"),
    ],
)
def test_bad_value_fails_naming_its_key(values, message):
    with pytest.raises(ValueError) as exc:
        check_values(with_values(**values))
    assert str(exc.value) == message


@pytest.mark.parametrize(
    "values",
    [
        dict(profile__enabled=True, profile__start_step=25_000),  # the last step (train.max_steps) is profiled
        dict(optim__decay_fraction=1.0),
        dict(optim__min_lr_ratio=0.0),
        dict(optim__min_lr_ratio=1.0),
        dict(optim__warmup_steps=0),
        dict(optim__grad_clip=0.0),
        dict(optim__weight_decay=0.0),
        dict(optim__betas=[0.0, 0.999]),
        dict(checkpoint__keep_last=1),
        dict(train__eval_interval=0),
        dict(train__activation_memory_budget=1.0),
        dict(deepspeed__offload_param=True, deepspeed__zero_stage=3),
        dict(deepspeed__offload_optimizer=True, deepspeed__zero_stage=1),
        dict(deepspeed__allgather_bucket_size=0),
        dict(deepspeed__allgather_bucket_size=123_456_789, deepspeed__zero_stage=3),  # ZeRO-3's prefetch size
        dict(deepspeed__allgather_bucket_size=123_456_789, deepspeed__zero_stage=0),  # unused
        dict(deepspeed__reduce_bucket_size=1),
        dict(train__seed=-(2**63)),
        dict(train__seed=2**63 - 1),
    ],
)
def test_values_at_the_edge_of_their_range_are_accepted(values):
    check_values(with_values(**values))


def test_the_first_bad_section_is_reported():
    cfg = with_values(wandb__mode="on", checkpoint__keep_last=0, train__device="tpu", optim__lr=0.0)
    with pytest.raises(ValueError, match="^optim.lr: must be > 0$"):
        check_values(cfg)
    check_values(valid())


def test_checkpoint_dir_is_checkpoint_dir_else_under_the_run_dir():
    cfg = valid()
    cfg.run.dir = "/runs/a"
    assert checkpoint_dir(cfg) == "/runs/a/checkpoints"
    cfg.checkpoint.dir = "/shared/ckpt"
    assert checkpoint_dir(cfg) == "/shared/ckpt"


def test_home_in_every_path_key_is_the_home_directory(monkeypatch):
    """A quoted `key='~/x'` reaches the config unexpanded; each path key reads it as the shell would."""
    from retnet_train.components.typed_config import expand_home

    monkeypatch.setenv("HOME", "/home/u")
    cfg = valid()
    cfg.run.dir, cfg.checkpoint.dir, cfg.data.paths = "~/run", "~/ckpt", ["~/web", "/d/code"]
    cfg.data.tokenizer, cfg.train.resume, cfg.train.init_weights = "~/tok.model", "~/old/run", "~/export"
    expand_home(cfg)
    assert (cfg.run.dir, cfg.checkpoint.dir, cfg.data.paths) == (
        "/home/u/run",
        "/home/u/ckpt",
        ["/home/u/web", "/d/code"],
    )
    assert (cfg.data.tokenizer, cfg.train.resume, cfg.train.init_weights) == (
        "/home/u/tok.model",
        "/home/u/old/run",
        "/home/u/export",
    )
    cfg = expand_home(valid())  # unset keys and the resume keywords stay as they are
    assert (cfg.checkpoint.dir, cfg.data.tokenizer, cfg.train.init_weights, cfg.train.resume) == (
        None,
        None,
        None,
        "auto",
    )


def test_context_parallel_needs_a_retnet():
    """Only RetNet's retention state passes between the ranks of a sequence: the trainer refused a Transformer
    after the process group and the model were built, and the preflight passed it."""
    cfg = with_values(parallel__context_parallel_size=2)
    cfg.model = {"arch": "transformer"}
    with pytest.raises(ValueError) as exc:
        check_values(cfg)
    assert str(exc.value) == (
        "parallel.context_parallel_size=2 needs model.arch=retnet, got transformer: only the retention state "
        "passes between the ranks of a sequence"
    )
    cfg.model = {"arch": "retnet"}
    check_values(cfg)


def retnet(**model) -> dict:
    return {"arch": "retnet", "d_model": 512, "n_layers": 2, "ffn_dim": 1024, **model}


def test_triton_at_a_key_head_dim_its_kernels_refuse_is_refused_at_start():
    """It passed the checks and failed at the first forward on the GPU (retention_op refuses key dims above 256)."""
    cfg = valid()
    cfg.model = retnet(n_heads=1, retention_backend="triton")
    with pytest.raises(ValueError) as exc:
        check_values(cfg)
    assert str(exc.value) == (
        "model.retention_backend=triton: key head dim 512 (model.d_model=512 / model.n_heads=1) is wider than the "
        "Triton kernels run (their GPU tests cover up to 256); model.retention_backend=auto or torch run it"
    )


@pytest.mark.parametrize(
    "model, context_parallel_size",
    [
        (retnet(n_heads=2, retention_backend="triton"), 1),  # key head dim 256: what the kernels run
        (retnet(n_heads=1, retention_backend="auto"), 1),  # auto takes fla or torch there
        (retnet(n_heads=1, retention_backend="torch"), 1),
        (retnet(n_heads=1, retention_backend="triton", mode="recurrent"), 1),  # retention_op runs torch for these
        (retnet(n_heads=1, retention_backend="triton"), 2),  # context parallel: a state with a gradient
        (retnet(n_heads=3, retention_backend="triton"), 1),  # the model's own check names n_heads
    ],
)
def test_backends_that_run_a_wide_key_head_pass(model, context_parallel_size):
    cfg = with_values(parallel__context_parallel_size=context_parallel_size)
    cfg.model = model
    check_values(cfg)

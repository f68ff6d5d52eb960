"""The Trainer's start, before its first step: build() sets up the process group, the run's directories, the
model, the data, the DeepSpeed engine and the checkpoint to resume from (what a resume would clobber or cannot
load is refused before anything is written); restore() loads that checkpoint into the engine and the stateful
parts (`state`, `loader`); _open_outputs() opens the run dir, the console banner, metrics, the profiler and the
progress bar. trainer.Trainer, which steps the run, is a TrainerSetup.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import Optional

import torch.distributed as dist

from .components.banner import start_banner
from .components.checkpoint import CheckpointManager, agreed_parts, load_initial_weights
from .components.checkpoint_discovery import tag_step
from .components.config import checkpoint_dir, grad_accumulation, resolved_config
from .components.distributed import init_distributed, pick_device, raise_first_problem
from .components.faults import NonFiniteTracker
from .components.loaders import build_loaders, tokenizer_record
from .components.metrics import MetricsLogger, Throughput, device_peak_flops, progress_bar
from .components.optim import build_engine
from .components.profiling import Profiler, profile_dir
from .components.rank_errors import SameOnEveryRank
from .components.reshard import prepare_resume, run_layout
from .components.resume import fresh_start_line, load_checkpoint, resumed_lines
from .components.resume_source import agreed_resume
from .components.rng import seed_everything
from .components.run_dir import claim_dirs, continues_run, open_run_dir
from .components.train_state import TrainState
from .model import build_model, model_config_from_dict
from .model.flops import flops_per_token
from .parallel import build_context_parallel, parallelize


class TrainerSetup:
    """Build, restore and open the outputs of a run; the attributes they set are the Trainer's."""

    # ------------------------------------------------------------------ build and restore

    def build(self) -> None:
        """Process group, model, data, DeepSpeed engine and the checkpoint to resume from (if any)."""
        cfg = self.cfg
        self.device = pick_device(cfg.train.device, cfg.deepspeed.precision, cfg.model.get("retention_backend"))
        init_distributed(self.device)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        self.ckpt = CheckpointManager(checkpoint_dir(cfg), cfg.checkpoint.keep_last, self.rank)
        self._claim_dirs()
        dp_rank = self._lay_out_batch()
        self.tokens_per_step = self.accum * cfg.train.micro_batch_size * cfg.data.seq_len * self.dp_world
        seed_everything(cfg.train.seed + self.rank)
        self.model_cfg = model_config_from_dict(cfg.model)
        self.model = self._build_model()
        # which tokenizer the token ids mean, for inference to check against; hashed once at launch, for the
        # loaders' check of the shards too (a relative data.tokenizer is the same file for both)
        self.tokenizer = tokenizer_record(cfg.data.tokenizer)
        sha = self.tokenizer["sha256"] if self.tokenizer else None
        self.loader, self.val_loader = build_loaders(cfg, self.model_cfg.vocab_size, dp_rank, self.dp_world, sha)
        # the loaders check every id against the vocabulary on the host (TokenStream.gather); the
        # model's own check would cost a device-to-host sync at the start of every micro-batch
        self.model.check_inputs = False
        faults = NonFiniteTracker(
            cfg.train.max_consecutive_nonfinite, scaler_skips_are_normal=cfg.deepspeed.precision == "fp16"
        )
        self.state = TrainState(faults=faults)

        self.resolved = resolved_config(cfg)
        # before anything is written: refuses to clobber; then what it refuses of the checkpoint, all in one error
        self.source = agreed_resume(cfg.train.resume, self.ckpt, self.resolved, self.world)
        saved, refused = agreed_parts(self.source, self.stateful, self.world)  # (another data stream: refused below)
        self.layout = run_layout(cfg, self.world)
        groups = cfg.optim.no_decay_embeddings  # another world size / ZeRO: converted; other model/groups/data: refused
        self.plan = prepare_resume(self.source, self.layout, self.rank, dict(cfg.model), groups, saved, refused)
        universal = bool(self.plan and self.plan.universal)
        self.engine, self.scheduler = build_engine(self.model, cfg, self.accum, self.world, self.device, universal)

    def _lay_out_batch(self) -> int:
        """Context-parallel groups and micro-batches per step for this world size; returns this rank's
        data-parallel rank. What does not divide is the config's fault, the same on every rank."""
        cfg = self.cfg
        try:
            # context parallel: P consecutive ranks share each sequence; the data comes per data-parallel rank
            self.cp, dp_rank, self.dp_world = build_context_parallel(
                cfg.parallel.context_parallel_size, self.rank, self.world, cfg.data.seq_len
            )
            self.accum = grad_accumulation(cfg, self.world)
        except ValueError as e:
            raise SameOnEveryRank(str(e)) from None
        return dp_rank

    def _claim_dirs(self) -> None:
        """Before anything is built: every directory this rank will write must be writable, and rank 0
        locks the run's directories against a second trainer. Every rank raises the first problem."""
        profile = self.cfg.profile
        profiled = profile_dir(self.cfg.run.dir, self.rank) if profile.enabled and self.rank in profile.ranks else None
        problem = claim_dirs(self.cfg.run.dir, self.ckpt.dir, profiled, self.is_main, self.locks)
        raise_first_problem(problem, self.world)

    def _build_model(self):
        train = self.cfg.train
        model = build_model(self.model_cfg)
        if train.init_weights:
            load_initial_weights(model, train.init_weights)
            if self.is_main:
                print(f"initial weights from {train.init_weights}", flush=True)
        return parallelize(
            model,
            compile=train.compile,
            activation_checkpointing=train.activation_checkpointing,
            activation_memory_budget=train.activation_memory_budget,
            context_parallel=self.cp,
        )

    @property
    def resume_path(self) -> Optional[str]:
        """The checkpoint this run resumes from, or None."""
        return os.path.join(*self.source) if self.source else None

    @property
    def resume_step(self) -> int:
        """The step of the checkpoint this run resumes from, by its tag (0: none, or a tag not ours)."""
        return (tag_step(self.source[1]) or 0) if self.source else 0

    @property
    def stateful(self) -> dict:
        """The parts a checkpoint restores, by their name in its client state."""
        return {"train_state": self.state, "data_loader": self.loader}

    def restore(self) -> None:
        """Load the checkpoint build() chose into the engine and the stateful parts."""
        if self.source is None:
            if self.is_main:
                print(fresh_start_line(self.cfg.train.resume, self.ckpt.dir), flush=True)
            return
        path, client = load_checkpoint(
            self.ckpt, self.engine, self.source, self.plan, self.stateful, self.cfg.train.seed, self.resolved["model"]
        )
        self.last_checkpoint = path
        if self.is_main:
            for line in resumed_lines(path, self.state, self.plan.notes, client.get("config"), self.resolved):
                print(line, flush=True)
            if self.loader.switched:
                print(self.loader.switched, flush=True)

    def _open_outputs(self) -> None:
        """Run dir, console banner, metrics, profiler and progress bar."""
        cfg, run_dir = self.cfg, self.cfg.run.dir
        resumed_from = self.source[0] if self.source else None  # the resumed checkpoint's directory
        problem = None
        try:  # rank 0's files and W&B; the profiler checks profile.ranks on every rank
            if self.is_main:
                open_run_dir(run_dir, self.ckpt.dir, resumed_from, self.resolved, self.state.step)
                print(self._banner(), flush=True)
            # every rank has a logger; only rank 0's writes metrics.jsonl and W&B
            # a run started from another run's checkpoint is a W&B run of its own, as it has its own metrics
            own = continues_run(self.ckpt.dir, resumed_from)
            self.logger = MetricsLogger(
                run_dir, self.is_main, cfg.wandb, self.resolved, self.state.wandb_id if own else None
            )
            self.state.wandb_id = self.logger.wandb_id
            self.profiler = Profiler(
                profile_dir(run_dir, self.rank),
                self.rank,
                self.world,
                self.device.type,
                self.state.step,
                **asdict(cfg.profile),
            )
        except (ValueError, OSError) as e:
            problem = str(e)
        raise_first_problem(problem, self.world)
        cp = self.world // self.dp_world  # context parallel: retention counted in the form each rank runs
        self.flops = flops_per_token(self.model_cfg, cfg.data.seq_len, self.device, cp)["model"]
        self.peak = device_peak_flops(self.device, cfg.train.peak_flops)
        self.throughput = Throughput(self.state.tokens_seen)
        self.bar = progress_bar(cfg.train.max_steps, self.state.step, self.is_main)

    def _banner(self) -> str:
        params = self.model.num_params()
        done = (self.state.step, self.state.tokens_seen)
        return start_banner(
            self.cfg, self.world, self.dp_world, self.accum, self.tokens_per_step, params, self.device.type, done
        )

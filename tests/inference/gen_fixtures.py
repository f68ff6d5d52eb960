"""Shared pieces for tests/inference (and tests/interop, tests/bench): a real sentencepiece tokenizer,
tiny models, and a real DeepSpeed checkpoint written in-process (gloo, world size 1)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from retnet_train.data import sha256_file
from retnet_train.data.manifest import MANIFEST_NAME, Manifest, ShardInfo, SplitInfo
from retnet_train.model import build_model, model_config_from_dict

VOCAB = 256
# the model overrides of the end-to-end trainer runs: a 2-layer, 32-wide RetNet over VOCAB ids
TINY_TRAINER_MODEL = {
    "model": "tiny",
    "model.vocab_size": VOCAB,
    "model.d_model": 32,
    "model.n_layers": 2,
    "model.n_heads": 2,
    "model.ffn_dim": 64,
    "model.chunk_size": 8,
}
TEXT = (
    "The quick brown fox jumps over the lazy dog. A retentive network keeps a state. "
    "def add(a, b):\n    return a + b\n"
    "Numbers: one two three four five six seven eight nine ten.\n"
)


def train_tokenizer(directory: Path, vocab_size: int = VOCAB, model_type: str = "unigram") -> Path:
    import sentencepiece as spm

    corpus = directory / "corpus.txt"
    # the repo's own model sources: varied enough text for a few hundred pieces
    src = Path(__file__).resolve().parents[2] / "retnet_train" / "model"
    corpus.write_text(TEXT * 5 + "".join(p.read_text() for p in sorted(src.glob("*.py"))))
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(directory / "tok"),
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=1.0,
        minloglevel=2,
        hard_vocab_limit=True,
        num_threads=1,
    )
    return directory / "tok.model"


TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b",
    "one two three four five six seven eight nine ten",
    "A retentive network keeps a state.",
]


def write_shards(directory, tokenizer, texts, sha=None):
    """A shard dir in the loader's manifest format (train and validation: the same documents,
    joined by EOS, uint16)."""
    import hashlib

    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    tokens = np.concatenate([np.array(sp.encode(t) + [sp.eos_id()]) for t in texts]).astype("<u2")
    directory.mkdir(parents=True)
    splits = {}
    for split in ("train", "validation"):
        payload = tokens.tobytes()
        (directory / f"{split}_00000.bin").write_bytes(payload)
        shard = ShardInfo(f"{split}_00000.bin", len(tokens), len(texts), hashlib.sha256(payload).hexdigest())
        splits[split] = SplitInfo(len(tokens), len(texts), (shard,))
    m = Manifest(
        directory,
        VOCAB,
        sp.eos_id(),
        sp.bos_id(),
        sp.pad_id(),
        sp.unk_id(),
        sha or sha256_file(tokenizer),
        "uint16",
        1 << 20,
        splits,
    )
    (directory / MANIFEST_NAME).write_text(json.dumps(m.to_json()))
    return tokens.astype(np.int64)


def tiny_config(arch: str = "retnet", **kw) -> dict:
    d = dict(arch=arch, vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=2, ffn_dim=64, norm_eps=1e-6)
    if arch == "retnet":
        d.update(chunk_size=4, retention_backend="torch")
    d.update(kw)
    return d


def tiny_model(arch: str = "retnet", **kw):
    return build_model(model_config_from_dict(tiny_config(arch, **kw))).eval()


def init_dist() -> None:
    import deepspeed

    if torch.distributed.is_initialized():
        return
    # A world of one on an in-memory store: no TCP port, and no RANK/MASTER_* variables left in
    # os.environ for the subprocesses that later tests start (they would inherit a busy port).
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed's engine insists on it
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)


def write_deepspeed_checkpoint(
    save_dir: Path,
    model_cfg: dict,
    stage: int,
    client_state: dict,
    steps: int = 2,
    tag: str | None = None,
    bf16: bool = False,
    complete: bool = True,
) -> torch.nn.Module:
    """Train `steps` Adam steps under ZeRO `stage` and save_checkpoint, marked COMPLETE as the trainer
    marks a finished save (unless complete=False); returns the trained model (its weights are what a
    loader must reproduce)."""
    import deepspeed

    init_dist()
    model = build_model(model_config_from_dict(model_cfg))
    ds_config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "torch_adam": True}},
        # threshold 0: ZeRO-3 partitions even these tiny weights (by default they stay gathered)
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "steps_per_print": 10**9,
        "bf16": {"enabled": bf16},
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(0, model_cfg["vocab_size"], (2, 9), generator=g)
        loss = engine(ids[:, :-1], labels=ids[:, 1:]).loss
        engine.backward(loss)
        engine.step()
    engine.save_checkpoint(str(save_dir), tag=tag, client_state=client_state)
    if complete:
        (Path(save_dir) / (Path(save_dir) / "latest").read_text().strip() / "COMPLETE").touch()
    if stage == 3:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # noqa: F401

        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            sd = {k: v.detach().clone().float() for k, v in engine.module.state_dict().items()}
    else:
        sd = {k: v.detach().clone().float() for k, v in engine.module.state_dict().items()}
    ref = build_model(model_config_from_dict(model_cfg))
    ref.load_state_dict(sd)
    engine.destroy() if hasattr(engine, "destroy") else None
    return ref.eval()


def two_checkpoint_run(root: Path, tags: tuple) -> tuple:
    """(tokenizer path, {tag: trained model}): a run dir root/run in the trainer's layout holding two
    complete ZeRO-2 checkpoints, `tags` after 1 and 2 steps (different weights)."""
    tok = str(train_tokenizer(root))
    cfg = tiny_config()
    client = {"config": {"model": cfg, "data": {"tokenizer": tok}}}
    save = root / "run" / "checkpoints"
    refs = {tag: write_deepspeed_checkpoint(save, cfg, 2, client, steps=n, tag=tag) for n, tag in enumerate(tags, 1)}
    return tok, refs


def require_lm_eval() -> None:
    """A failure, not a skip: CI must install lm-eval (see the Makefile), else the adapter is untested."""
    import pytest

    try:
        import lm_eval  # noqa: F401
    except ImportError:
        pytest.fail("lm-eval is not installed: pip install lm-eval==0.4.13")


def eval_setup(tmp_path_factory) -> tuple:
    """(directory, tokenizer, tiny RetNet, its native export, validation shards of TEXTS) for the
    evaluate and lm-eval adapter tests."""
    from retnet_train.inference.native import save_native

    d = tmp_path_factory.mktemp("eval")
    tok = train_tokenizer(d)
    model = tiny_model("retnet")
    exp = save_native(model, str(d / "exp"), str(tok))
    tokens = write_shards(d / "shards", tok, TEXTS * 6)
    return d, tok, model, exp, tokens

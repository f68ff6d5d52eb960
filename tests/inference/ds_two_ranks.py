"""Worker for test_checkpoint_world_size: one of two gloo ranks training a tiny model under
ZeRO and saving a checkpoint; rank 0 also writes the gathered full weights for comparison.
Usage: python ds_two_ranks.py RANK PORT STAGE SAVE_DIR"""

import json
import os
import sys

import torch

rank, port, stage, save_dir = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
torch.set_num_threads(1)
import deepspeed  # noqa: E402
from gen_fixtures import tiny_config  # noqa: E402

from retnet_train.model import build_model, model_config_from_dict  # noqa: E402

deepspeed.init_distributed(dist_backend="gloo", verbose=False)
cfg = tiny_config()
torch.manual_seed(0)
model = build_model(model_config_from_dict(cfg))
ds = {
    "train_micro_batch_size_per_gpu": 1,
    "gradient_accumulation_steps": 1,
    "steps_per_print": 10**9,
    "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "torch_adam": True}},
    "zero_optimization": {"stage": stage},
}
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
g = torch.Generator().manual_seed(rank)
for _ in range(2):
    ids = torch.randint(0, cfg["vocab_size"], (1, 9), generator=g)
    engine.backward(engine(ids[:, :-1], labels=ids[:, 1:]).loss)
    engine.step()
engine.save_checkpoint(save_dir, client_state={"config": {"model": cfg}})
with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), enabled=stage == 3):
    sd = {k: v.detach().float().clone() for k, v in engine.module.state_dict().items()}
if rank == 0:
    torch.save(sd, os.path.join(save_dir, "reference.pt"))
torch.distributed.barrier()
if rank == 0:  # every rank's files are on disk: marked as the trainer marks a finished save
    with open(os.path.join(save_dir, "latest")) as f:
        open(os.path.join(save_dir, f.read().strip(), "COMPLETE"), "w").close()
print(json.dumps({"rank": rank, "ok": True}))

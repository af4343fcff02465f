"""A Ray job (tests/integration/test_multinode.py): one epoch of the training split through the workers' own
iteration (``worker._batches`` over ``ray.train.get_dataset_shard``, with the driver's datasets, scaling and data
config), each rank on its node. Prints one JSON line: per rank its node id and a digest of every row it saw,
and the digests of every row of the split read whole.

    python tests/integration/multinode_rows.py <hydra overrides...>
"""

from __future__ import annotations

import hashlib
import json
import sys

import ray
import ray.train
import torch
from ray.train.torch import TorchTrainer

from pipeline.config import load
from pipeline.training import driver, worker


def _digests(x: torch.Tensor) -> list[str]:
    """A digest of each stored row (its preprocessed bytes): the rows carry no id of their own."""
    return [hashlib.blake2b(row.numpy().tobytes(), digest_size=8).hexdigest() for row in x.cpu()]


def one_epoch(loop_config: dict) -> dict | None:
    cfg = load(loop_config["overrides"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    seen = []
    for epoch, stored, _label in worker._batches(
        worker._shard("train"),
        cfg.data.batch_size // world,
        torch.device("cpu"),
        0,
        seed=cfg.trainer.seed * 7919 + rank,
    ):
        if epoch > 0:
            break
        seen += _digests(stored)
    mine = {"rank": rank, "node": ray.get_runtime_context().get_node_id(), "rows": seen}
    everyone = [None] * world
    torch.distributed.all_gather_object(everyone, mine)
    return {"ranks": everyone} if rank == 0 else None


def main(overrides: list[str]) -> None:
    cfg = load(overrides)
    ray.init()
    datasets = driver._datasets(cfg)
    every_row = [d for batch in datasets["train"].iter_torch_batches(batch_size=256) for d in _digests(batch["x"])]
    trainer = TorchTrainer(
        one_epoch,
        train_loop_config={"overrides": overrides},
        scaling_config=driver.scaling_config(cfg),
        datasets=datasets,
        dataset_config=driver.data_config(cfg),
    )
    result = trainer.fit()
    print("ROWS_JSON " + json.dumps({**result.return_value, "every_row": every_row}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])

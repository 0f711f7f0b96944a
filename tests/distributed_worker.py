"""Run under ``torchrun --nproc_per_node 2``: one DDP forward/backward of ALIGN's loss on this rank's shard.

Writes ``rank{r}.pt`` with the loss and every parameter's gradient into the directory given as
the first argument, and the same for a training step that accumulates two micro-batches and for
one with activation checkpointing. Rank r
takes examples r, r + world, r + 2·world, ... of the global batch that ``global_batch()``
builds, so that its ghost batches are exactly those a single process forms from the whole batch
(see tests/test_distributed.py).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

import openalign
from openalign.distributed import average_buffers, init_distributed
from openalign.losses import ContrastiveLoss
from openalign.train import train_step

BATCH = 16


def global_batch() -> dict:
    generator = torch.Generator().manual_seed(123)
    input_ids = torch.randint(1000, 30000, (BATCH, 16), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    lengths = torch.randint(4, 17, (BATCH,), generator=generator)
    attention_mask[torch.arange(16)[None, :] >= lengths[:, None]] = 0
    input_ids[:, 0] = 101
    return {"image": torch.randn(BATCH, 3, 32, 32, generator=generator),
            "text": {"input_ids": input_ids * attention_mask, "attention_mask": attention_mask}}


def shard(batch: dict, rank: int, world_size: int) -> dict:
    return {"image": batch["image"][rank::world_size],
            "text": {k: v[rank::world_size] for k, v in batch["text"].items()}}


def build_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return openalign.create_model("align-test")


def main(out_dir: Path) -> None:
    ctx = init_distributed("cpu")
    model = build_model()
    ddp = DistributedDataParallel(model)
    with warnings.catch_warnings(record=True) as caught:  # the gathering loss warns of nothing, under the filters set
        loss = ContrastiveLoss(label_smoothing=0.1)(**ddp(**shard(global_batch(), ctx.rank, ctx.world_size)))
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    own = {name: b.clone() for name, b in model.named_buffers()}  # this rank's batch-norm statistics
    average_buffers(model)
    averaged = {name: b.clone() for name, b in model.named_buffers()}
    # the same step in two micro-batches per rank (train.accum_steps: 2), DDP set up as train() does it,
    # counting DDP's gradient all-reduces (one per bucket and synchronised backward pass)
    accumulated, all_reduces = build_model(), []
    accumulated_ddp = DistributedDataParallel(accumulated, broadcast_buffers=False)

    def counting_all_reduce(state, bucket):
        all_reduces.append(bucket.index())
        return default_hooks.allreduce_hook(None, bucket)

    accumulated_ddp.register_comm_hook(None, counting_all_reduce)
    sgd = torch.optim.SGD(accumulated.parameters(), lr=0.0)
    accumulated_loss = train_step(accumulated, ContrastiveLoss(label_smoothing=0.1), sgd,
                                  torch.optim.lr_scheduler.LambdaLR(sgd, lambda step: 1.0),
                                  shard(global_batch(), ctx.rank, ctx.world_size), ctx.device, "fp32",
                                  forward=accumulated_ddp, accum_steps=2)
    # the first step again with activation checkpointing (train.grad_checkpointing), DDP as train() sets it up
    checkpointed = build_model()
    checkpointed.set_grad_checkpointing(True)
    checkpointed_ddp = DistributedDataParallel(checkpointed, broadcast_buffers=False)
    ContrastiveLoss(label_smoothing=0.1)(**checkpointed_ddp(**shard(global_batch(), ctx.rank, ctx.world_size))
                                         ).backward()
    torch.save({"loss": loss.detach(), "grads": grads, "warnings": [str(w.message) for w in caught],
                "buffers": own, "averaged": averaged,
                "accumulated_loss": accumulated_loss, "all_reduced_buckets": all_reduces,
                "accumulated_grads": {name: p.grad.clone() for name, p in accumulated.named_parameters()},
                "checkpointed_grads": {name: p.grad.clone() for name, p in checkpointed.named_parameters()},
                "checkpointed_buffers": {name: b.clone() for name, b in checkpointed.named_buffers()}},
               out_dir / f"rank{ctx.rank}.pt")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))

"""Run under ``torchrun --nproc_per_node 2``: one DDP forward/backward of ALIP's loss on this rank's shard,
with the ALIP bi-path model built on ALIGN's towers by config alone (``text_fields: [text, caption]``).

Writes ``rank{r}.pt`` with the loss, the gate statistics and buffers, and every parameter's gradient.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

import distributed_worker
import openalign
from openalign.distributed import init_distributed
from openalign.losses import ALIPLoss


def global_batch() -> dict:
    batch = distributed_worker.global_batch()
    text = batch["text"]
    caption_ids = text["input_ids"].roll(3, dims=0).clone()  # another caption per image, same shapes
    caption_ids[:, 5:] = 0
    caption_mask = (caption_ids != 0).long()
    return {**batch, "caption": {"input_ids": caption_ids, "attention_mask": caption_mask}}


def shard(batch: dict, rank: int, world_size: int) -> dict:
    return {"image": batch["image"][rank::world_size],
            **{field: {k: v[rank::world_size] for k, v in batch[field].items()} for field in ("text", "caption")}}


def build_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return openalign.create_model("align-test", text_fields=["text", "caption"])


def run(loss_fn: ALIPLoss, model: torch.nn.Module, forward: torch.nn.Module, batch: dict) -> dict:
    """Two steps' losses (the running averages move between them), the second's gradients, the
    loss's buffers and statistics."""
    losses = []
    for _ in range(2):
        model.zero_grad()
        loss = loss_fn(**forward(**batch))
        loss.backward()
        losses.append(loss.detach())
    return {"losses": torch.stack(losses), "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
            "buffers": {n: b.clone() for n, b in loss_fn.named_buffers()},
            "stats": {k: v.clone() for k, v in loss_fn.last_stats.items()}}


def main(out_dir: Path) -> None:
    ctx = init_distributed("cpu")
    model = build_model()
    result = run(ALIPLoss(), model, DistributedDataParallel(model), shard(global_batch(), ctx.rank, ctx.world_size))
    torch.save(result, out_dir / f"rank{ctx.rank}.pt")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))

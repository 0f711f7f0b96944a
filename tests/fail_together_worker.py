"""Run under ``torchrun --nproc_per_node 2``: ``fail_together`` blocks that fail on one rank.

Argument: an output directory. Each scenario is run by both ranks, then a sum over ranks checks
that their collectives are still paired (a rank one collective ahead would sum other values or
hang). Writes ``rank{r}.json``: per scenario, the error each rank raised and that sum.
"""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

import torch
from PIL import Image

import openalign
from openalign.distributed import (DistributedContext, PeerFailure, all_reduce_sum, fail_together, init_distributed,
                                   shutdown)
from openalign.eval.features import embed_images, eval_transform
from openalign.train.checkpoint import Checkpointer


def scenario(ctx: DistributedContext, name: str, out_dir: Path) -> None:
    rank = ctx.rank
    if name == "a checkpoint save fails on rank 1":  # its data position cannot be written
        model = torch.nn.Linear(2, 2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        Checkpointer(out_dir / "checkpoints", 2, ctx).save(1, model, optimizer, scheduler, torch.nn.Identity(), {},
                                                          {"position": 1 if rank == 0 else object()})
    elif name == "an evaluation image only rank 1 reads is unreadable":  # ranks embed paths[rank::2]
        images, folder = [], out_dir / f"images{rank}"  # each rank its own copy: no two writers of one file
        folder.mkdir()
        for index in range(4):
            images.append(folder / f"{index}.png")
            Image.new("RGB", (40, 40), (60 * index, 20, 20)).save(images[-1])
        images[1].write_bytes(b"not an image")
        model = openalign.create_model("align-test").eval()
        embed_images(model, eval_transform(model), images, torch.device("cpu"), batch_size=2, show_progress=False)
    elif name == "none fails":
        with fail_together("outer"):
            with fail_together("inner"):
                pass
    elif name == "rank 1 fails before an inner block":
        with fail_together("outer"):
            if rank == 1:
                raise ValueError("rank 1's own error")
            with fail_together("inner"):  # rank 0 learns of rank 1's error here, and the outer block passes it on
                pass
    elif name == "rank 0 fails inside an inner block":
        with fail_together("outer"):
            with fail_together("inner"):
                if rank == 0:
                    raise ValueError("rank 0's own error")
            with fail_together("second inner"):
                pass
    elif name == "an agreed error raised again as another":  # as `raise ConfigError(...) from None` would
        with fail_together("outer"):
            try:
                with fail_together("inner"):
                    if rank == 1:
                        raise ValueError("rank 1's own error")
            except PeerFailure:  # on rank 0 only
                raise RuntimeError("wrapped") from LookupError("another cause")
    elif name == "a clean-up block after an agreed error fails on the other rank":
        with fail_together("outer"):
            try:
                with fail_together("inner"):
                    if rank == 0:
                        raise ValueError("rank 0's own error")
            finally:
                with fail_together("clean-up"):  # entered after the agreement: agreed on afresh
                    if rank == 1:
                        raise OSError("rank 1's clean-up error")
    elif name == "both fail":
        with fail_together("outer"):
            raise ValueError(f"rank {rank}'s own error")


def main(out_dir: Path) -> None:
    # unpaired collectives would wait for gloo's default 30 minutes: fail the test within one
    torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    ctx = init_distributed("cpu")
    results = {}
    for index, name in enumerate(["none fails", "rank 1 fails before an inner block",
                                  "rank 0 fails inside an inner block", "both fail",
                                  "an agreed error raised again as another",
                                  "a clean-up block after an agreed error fails on the other rank",
                                  "a checkpoint save fails on rank 1",
                                  "an evaluation image only rank 1 reads is unreadable"]):
        try:
            scenario(ctx, name, out_dir)
            error = None
        except Exception as raised:  # noqa: BLE001 - the test reads what was raised
            error = f"{type(raised).__name__}: {raised}"
        paired = all_reduce_sum(torch.tensor(float(index))).item()  # 2 × index when the ranks are in step
        results[name] = {"error": error, "paired": paired}
    (out_dir / f"rank{ctx.rank}.json").write_text(json.dumps(results))
    shutdown()  # a process group alive at exit can abort its process (gloo: "terminate called ...")


if __name__ == "__main__":
    main(Path(sys.argv[1]))

"""Training throughput and peak memory per model and per-device batch: the trainer's own step.

Each configuration builds the model as the trainer does (channels_last, LAMB over the same
parameter groups, ALIGN's contrastive loss, bf16 autocast on GPU), feeds synthetic batches at
the model's input size, and times ``openalign.train.train_step`` after warm-up steps.

    python benchmarks/train_throughput.py                                   # CPU: tiny models
    python benchmarks/train_throughput.py --models align-b3-mini align-b7-base \\
        --batch-sizes 128 256 --device cuda --compile                       # GPU
    python benchmarks/train_throughput.py --models align-tiny --batch-sizes 128 \\
        --accum-steps 1 2 4                      # the cost of gradient accumulation (train.accum_steps)
    python benchmarks/train_throughput.py --models align-tiny --batch-sizes 128 \\
        --grad-checkpointing off on              # activation checkpointing (train.grad_checkpointing)
    python benchmarks/train_throughput.py --models clippo-tiny --batch-sizes 64 \\
        --optimizers adamw adafactor             # the optimiser's share of a step (train.optimizer)
    python benchmarks/train_throughput.py --models align-tiny --batch-sizes 128 \\
        --ema off on                             # the weight average's update (train.ema_decay)

"held for backward" is what one step's forward passes keep for the backward pass, counted tensor
by tensor as autograd saves them: the activation memory checkpointing saves. It is the same on any
device at the same precision (fp32 on the CPU, bf16 on a GPU); with accumulation it is summed over
the micro-batches, which hold theirs one at a time.

Prints a table and writes JSON (``--output``, default runs/benchmarks/train_throughput.json).
"""

from __future__ import annotations

import argparse
import gc
import resource
import time
from collections.abc import Callable

import torch
from common import add_output, environment, report

import openalign
from openalign.losses import ContrastiveLoss
from openalign.train import build_optimizer, build_scheduler, train_step
from openalign.train.ema import WeightAverage


def synthetic_batch(model: torch.nn.Module, batch_size: int, device: torch.device) -> dict:
    config = model.config
    size = config.preprocess.image_size
    image = torch.randn(batch_size, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    if not hasattr(config, "text"):  # a pixel model (CLIPPO): rendered captions
        return {"image": image, "text": dict(config.build_tokenizer()([f"synthetic caption {i}"
                                                                        for i in range(batch_size)]).to(device))}
    input_ids = torch.randint(1000, 30000, (batch_size, config.text.max_length), device=device)
    return {"image": image, "text": {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}}


def measure(name: str, batch_size: int, device: torch.device, steps: int, warmup: int, compile: bool,
            standard_bn: bool = False, accum_steps: int = 1, checkpointing: bool = False,
            optimizer_name: str = "lamb", ema: bool = False) -> dict:
    """One configuration's row; where the GPU runs out of memory, a row saying so (``out_of_memory``,
    no numbers), so that the other configurations still run and are reported."""
    row = {"model": name, "batch_size": batch_size, "precision": "bf16" if device.type == "cuda" else "fp32",
           "compile": compile, "batch_norm": "standard" if standard_bn else "ghost", "accum_steps": accum_steps,
           "grad_checkpointing": checkpointing, "optimizer": optimizer_name, "ema": ema, "out_of_memory": False}
    gc.collect()  # the previous configuration's model and optimiser state: gone before this one's peak is taken
    if device.type == "cuda":
        torch.cuda.empty_cache()
    try:
        row.update(_measure(name, batch_size, device, steps, warmup, compile, standard_bn, accum_steps, checkpointing,
                            optimizer_name, ema))
    except torch.cuda.OutOfMemoryError:
        row.update(out_of_memory=True, samples_per_second=None, seconds_per_step=None, peak_memory_gib=None,
                   held_for_backward_mib=None, ema_mib=None)
    print(row, flush=True)  # in the log should a later configuration fail
    return row


def _measure(name: str, batch_size: int, device: torch.device, steps: int, warmup: int, compile: bool,
             standard_bn: bool, accum_steps: int, checkpointing: bool, optimizer_name: str, ema: bool) -> dict:
    torch.manual_seed(0)
    overrides = {"image": {"virtual_batch_size": None}} if standard_bn else {}
    model = openalign.create_model(name, **overrides).to(device).to(memory_format=torch.channels_last)
    model.set_grad_checkpointing(checkpointing)
    eps = 1e-30 if optimizer_name == "adafactor" else 1e-6
    optimizer = build_optimizer(model, optimizer_name, 1e-3, 1e-5, (0.9, 0.999), eps, device)
    scheduler = build_scheduler(optimizer, "constant", 0, steps + warmup)
    forward = torch.compile(model) if compile else model
    average = WeightAverage(model, 0.9999) if ema else None
    loss_fn, batch = ContrastiveLoss(), synthetic_batch(model, batch_size, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(warmup + steps):
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
        loss = train_step(model, loss_fn, optimizer, scheduler, batch, device, forward=forward,
                          accum_steps=accum_steps)
        if average is not None:
            average.update(step + 1)
    loss.item()  # wait for the device
    seconds = time.perf_counter() - start
    held = None if compile else held_for_backward(
        lambda: train_step(model, loss_fn, optimizer, scheduler, batch, device, accum_steps=accum_steps))
    if device.type == "cuda":
        peak_gib = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process peak RSS (KiB on Linux)
    return {"samples_per_second": batch_size * steps / seconds, "seconds_per_step": seconds / steps,
            "peak_memory_gib": peak_gib, "held_for_backward_mib": held,
            "ema_mib": average.nbytes / 2**20 if average is not None else 0.0}


def held_for_backward(step: Callable[[], object]) -> float:
    """MiB of the tensors autograd saves for the backward pass in ``step()`` (not under torch.compile,
    whose graphs save their own)."""
    sizes = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        sizes.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step()
    return sum(sizes) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["align-test", "align-tiny"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[64, 128])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--standard-bn", action="store_true",
                        help="standard batch norm instead of the models' ghost batch norm (virtual_batch_size null)")
    parser.add_argument("--accum-steps", nargs="+", type=int, default=[1],
                        help="train.accum_steps values: each batch in that many micro-batches, caching features")
    parser.add_argument("--grad-checkpointing", nargs="+", choices=["off", "on"], default=["off"],
                        help="train.grad_checkpointing: recompute each block in the backward pass")
    parser.add_argument("--optimizers", nargs="+", choices=["lamb", "adamw", "adafactor"], default=["lamb"],
                        help="train.optimizer values")
    parser.add_argument("--ema", nargs="+", choices=["off", "on"], default=["off"],
                        help="train.ema_decay: update a weight average after each step")
    add_output(parser, "train_throughput")
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = [measure(name, batch, device, args.steps, args.warmup, args.compile, args.standard_bn, accum,
                    checkpointing == "on", optimizer, ema == "on")
            for name in args.models for batch in args.batch_sizes for accum in args.accum_steps
            for checkpointing in args.grad_checkpointing for optimizer in args.optimizers for ema in args.ema]
    env = environment(device)
    cells = [(row["model"], row["optimizer"], str(row["batch_size"]), str(row["accum_steps"]), row["batch_norm"],
              row["precision"],
              str(row["compile"]), "on" if row["grad_checkpointing"] else "off", "on" if row["ema"] else "off",
              *(("out of memory", "–", "–", "–") if row["out_of_memory"] else
                (f"{row['samples_per_second']:.1f}", f"{row['seconds_per_step']:.3f}", f"{row['peak_memory_gib']:.2f}",
                 "–" if row["held_for_backward_mib"] is None else f"{row['held_for_backward_mib']:.0f}")))
             for row in rows]
    report(f"training throughput on {env['device']} (torch {torch.__version__})",
           ("model", "optimizer", "batch/device", "accum", "batch norm", "precision", "compile", "checkpointing",
            "ema", "samples/s",
            "s/step", "peak memory GiB", "held for backward MiB"),
           cells, 1,
           {"environment": env, "results": rows}, args.output)

if __name__ == "__main__":
    main()

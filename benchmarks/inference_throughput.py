"""Inference throughput: openalign against transformers.AlignModel, with the same weights.

A random ``transformers.AlignModel`` of the preset's size is written with ``save_pretrained`` to a
temporary directory and read back with ``openalign.load_pretrained``, so both libraries hold
identical weights (the script checks their fp32 embeddings agree). For each tower it measures the
batch-1 latency (median ms per call) and the large-batch throughput (images/s, texts/s) of the
embedding call: openalign's ``encode_image`` / ``encode_text`` on the model as
``openalign.optimize_for_inference`` prepares it (and the embed / classify / search commands run it:
channels-last, batch norms folded into the convolutions) and transformers' ``get_image_features`` /
``get_text_features`` (its defaults). fp32 on CPU; bf16 autocast on CUDA, where the script also
reports how close each library's bf16 embeddings come to transformers' fp32 ones (least cosine
similarity over a batch of 16); ``--compile`` wraps both calls in ``torch.compile`` (one static graph per
batch size). Texts are 64 tokens (ALIGN's padded length), 20 of them real. fp32 references run without
TF32 (cuDNN's convolutions default to it on CUDA). ``--min-cosine`` / ``--max-fp32-diff`` stop the run
before any timing where the embeddings disagree (benchmarks/gpu/run.sh's check part).

    python benchmarks/inference_throughput.py                                  # CPU, small model, ~1 min
    python benchmarks/inference_throughput.py --preset align-base --device cuda --compile

Prints a table and writes JSON (``--output``, default runs/benchmarks/inference_throughput.json).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import (AlignConfig, AlignModel, AlignProcessor, AlignTextConfig, AlignVisionConfig,
                          EfficientNetImageProcessor)

from common import add_output, environment, report

import openalign
from openalign.data.tokenizer import load_hf_tokenizer
from openalign.precision import autocast

# Sizes of the random AlignModel. "small": EfficientNet ×0.5 width and depth at 128 px and a
# 2-layer BERT; "align-base": kakaobrain/align-base's EfficientNet-B7 at 289 px and BERT-base.
PRESETS: dict[str, dict[str, Any]] = {
    "small": {"vision": {"width_coefficient": 0.5, "depth_coefficient": 0.5, "image_size": 128},
              "text": {"num_hidden_layers": 2, "hidden_size": 256, "num_attention_heads": 4,
                       "intermediate_size": 1024},
              "projection_dim": 160},
    "align-base": {"vision": {"width_coefficient": 2.0, "depth_coefficient": 3.1, "image_size": 289},
                   "text": {}, "projection_dim": 640},
}
TEXT_LENGTH, REAL_TOKENS = 64, 20

Encoder = Callable[[dict[str, torch.Tensor]], torch.Tensor]


def build_models(preset: str, directory: Path) -> tuple[torch.nn.Module, AlignModel]:
    """The random AlignModel of ``preset`` and openalign's load of its ``save_pretrained`` directory."""
    sizes = PRESETS[preset]
    torch.manual_seed(0)
    vision = AlignVisionConfig(depthwise_padding=[], **sizes["vision"])
    config = AlignConfig(text_config=AlignTextConfig(**sizes["text"]).to_dict(), vision_config=vision.to_dict(),
                         projection_dim=sizes["projection_dim"])
    hf = AlignModel(config)
    calibrate_batch_norm(hf, vision.image_size)
    hf.save_pretrained(directory)
    size = vision.image_size
    processor = EfficientNetImageProcessor(size={"height": round(size * 346 / 289), "width": round(size * 346 / 289)},
                                           crop_size={"height": size, "width": size}, rescale_factor=1 / 127.5,
                                           rescale_offset=True, do_normalize=False, include_top=False)
    tokenizer = load_hf_tokenizer("bert-base-uncased")
    AlignProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(directory)
    model, _, _ = openalign.load_pretrained(directory)
    return model.eval(), hf


@torch.no_grad()
def calibrate_batch_norm(hf: AlignModel, image_size: int) -> None:
    """Set the running statistics to those of one random batch, then eval mode.

    With HF's random init and unit running variance, activations shrink through the blocks
    (image embeddings ~1e-26, near fp32's denormals, which are slow on CPUs); calibrated batch
    norm keeps them of order one, as in a trained model.
    """
    norms = [module for module in hf.modules() if isinstance(module, torch.nn.BatchNorm2d)]
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average: after one batch, that batch's statistics
    hf.train()
    hf.get_image_features(pixel_values=torch.rand(8, 3, image_size, image_size) * 2 - 1)
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    hf.eval()


def make_inputs(batch_size: int, image_size: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Random pixels in [-1, 1] (also channels-last) and token ids with 20 real tokens of 64."""
    generator = torch.Generator().manual_seed(batch_size)
    pixels = torch.rand(batch_size, 3, image_size, image_size, generator=generator) * 2 - 1
    input_ids = torch.randint(1000, 30000, (batch_size, TEXT_LENGTH), generator=generator)
    attention_mask = (torch.arange(TEXT_LENGTH) < REAL_TOKENS).long().expand(batch_size, -1).contiguous()
    inputs = {"pixels": pixels, "input_ids": input_ids * attention_mask, "attention_mask": attention_mask}
    inputs = {name: value.to(device) for name, value in inputs.items()}
    inputs["pixels_channels_last"] = inputs["pixels"].contiguous(memory_format=torch.channels_last)
    return inputs


def encoders(model: torch.nn.Module, hf: AlignModel, compile: bool) -> dict[tuple[str, str], Encoder]:
    """The embedding call of each (library, tower), unnormalised as transformers returns them."""
    image, text = model.encode_image, model.encode_text
    hf_image, hf_text = hf.get_image_features, hf.get_text_features
    if compile:  # static: batch 1 then the large batch would otherwise recompile the second with a dynamic batch
        image, text, hf_image, hf_text = (torch.compile(f, dynamic=False) for f in (image, text, hf_image, hf_text))
    return {
        ("openalign", "image"): lambda x: image(x["pixels_channels_last"], normalize=False),
        ("transformers", "image"): lambda x: hf_image(pixel_values=x["pixels"]).pooler_output,
        ("openalign", "text"): lambda x: text(x["input_ids"], x["attention_mask"], normalize=False),
        ("transformers", "text"): lambda x: hf_text(input_ids=x["input_ids"],
                                                    attention_mask=x["attention_mask"]).pooler_output,
    }


@torch.inference_mode()
def call_seconds(encode: Encoder, inputs: dict[str, torch.Tensor], device: torch.device, precision: str,
                 warmup: int, iterations: int) -> float:
    """Median wall-clock seconds of one call, after ``warmup`` calls."""
    times = []
    for step in range(warmup + iterations):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with autocast(device, precision):
            encode(inputs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


@contextlib.contextmanager
def full_fp32() -> Iterator[None]:
    """fp32 matmuls and convolutions without TF32, which cuDNN's convolutions use on CUDA by default."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


@torch.inference_mode()
def parity(calls: dict[tuple[str, str], Encoder], inputs: dict[str, torch.Tensor]) -> dict[str, float]:
    """Max absolute difference of the two libraries' fp32 embeddings over their max magnitude, per tower."""
    differences = {}
    for tower in ("image", "text"):
        with full_fp32():
            ours, theirs = calls[("openalign", tower)](inputs).float(), calls[("transformers", tower)](inputs).float()
        differences[tower] = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    return differences


@torch.inference_mode()
def low_precision_agreement(calls: dict[tuple[str, str], Encoder], inputs: dict[str, torch.Tensor],
                            device: torch.device, precision: str) -> dict[str, float]:
    """The least cosine similarity, over the batch, of each library's embeddings at ``precision``
    to transformers' fp32 embeddings, per (library, tower): how far bf16 moves either library."""
    agreement = {}
    for tower in ("image", "text"):
        with full_fp32():
            reference = calls[("transformers", tower)](inputs).float()
        for library in ("openalign", "transformers"):
            with autocast(device, precision):
                embedding = calls[(library, tower)](inputs).float()
            cosine = torch.nn.functional.cosine_similarity(embedding, reference, dim=-1)
            agreement[f"{library}/{tower}"] = cosine.min().item()
    return agreement


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="auto: bf16 autocast on CUDA, fp32 on CPU")
    parser.add_argument("--batch-size", type=int, help="the large batch (default 64 on CPU, 256 on CUDA)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--compile", action="store_true", help="torch.compile both libraries' calls")
    parser.add_argument("--no-latency", action="store_true",
                        help="skip the batch-1 latency (with --compile: half the compilations)")
    parser.add_argument("--min-cosine", type=float,
                        help="stop before timing unless openalign's least cosine to transformers' fp32 embeddings "
                             "(at --precision) reaches this in both towers")
    parser.add_argument("--max-fp32-diff", type=float,
                        help="stop before timing if the libraries' fp32 relative difference exceeds this")
    add_output(parser, "inference_throughput")
    args = parser.parse_args()
    device = torch.device(args.device)
    batch_size = args.batch_size or (256 if device.type == "cuda" else 64)
    precision = "bf16" if args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda") else "fp32"
    with tempfile.TemporaryDirectory() as directory:
        model, hf = build_models(args.preset, Path(directory))
    model, hf = openalign.optimize_for_inference(model.to(device), inplace=True), hf.to(device)
    image_size = PRESETS[args.preset]["vision"]["image_size"]
    calls = encoders(model, hf, args.compile)
    plain_calls = encoders(model, hf, compile=False)
    differences = parity(plain_calls, make_inputs(2, image_size, device))
    agreement = (low_precision_agreement(plain_calls, make_inputs(16, image_size, device), device, precision)
                 if precision != "fp32" else {})
    print(f"fp32 relative difference: {differences}; least cosine of {precision} to transformers' fp32: {agreement}")
    problems = [f"fp32 {tower} difference {value:.1e} > {args.max_fp32_diff}" for tower, value in differences.items()
                if args.max_fp32_diff is not None and not value <= args.max_fp32_diff]  # NaN fails
    problems += [f"{name} least cosine {value:.5f} < {args.min_cosine}" for name, value in agreement.items()
                 if args.min_cosine is not None and name.startswith("openalign/") and not value >= args.min_cosine]
    if problems:
        raise SystemExit("the embeddings disagree, nothing timed: " + "; ".join(problems))
    batches = {1: make_inputs(1, image_size, device), batch_size: make_inputs(batch_size, image_size, device)}
    rows = []
    for (library, tower), encode in calls.items():
        latency = (None if args.no_latency else
                   call_seconds(encode, batches[1], device, precision, args.warmup, args.iterations))
        seconds = call_seconds(encode, batches[batch_size], device, precision, args.warmup, args.iterations)
        rows.append({"library": library, "tower": tower, "precision": precision, "compile": args.compile,
                     "latency_ms_batch1": None if latency is None else 1000 * latency, "batch_size": batch_size,
                     "items_per_second": batch_size / seconds})
        if args.compile:  # the compiled call computes what the plain one does (at the large batch: no recompiling)
            with torch.inference_mode(), autocast(device, precision):
                compiled, plain = encode(batches[batch_size]), plain_calls[(library, tower)](batches[batch_size])
            rows[-1]["least_cosine_compiled_to_eager"] = torch.nn.functional.cosine_similarity(
                compiled.float(), plain.float(), dim=-1).min().item()
        print(rows[-1])  # in the log should a later call fail
    env = environment(device, preset=args.preset, image_size=image_size, text_length=TEXT_LENGTH,
                      real_tokens=REAL_TOKENS, transformers=transformers.__version__)
    reference = {row["tower"]: row["items_per_second"] for row in rows if row["library"] == "transformers"}
    cells = [(row["library"], row["tower"], row["precision"], str(row["compile"]),
              "–" if row["latency_ms_batch1"] is None else f"{row['latency_ms_batch1']:.2f}",
              str(row["batch_size"]), f"{row['items_per_second']:.1f}",
              f"{row['items_per_second'] / reference[row['tower']]:.2f}") for row in rows]
    title = (f"inference, {args.preset} preset, on {env['device']} (torch {env['torch']}); fp32 relative difference: "
             f"image {differences['image']:.1e}, text {differences['text']:.1e}")
    if agreement:
        title += f"; least cosine of {precision} to transformers' fp32: " + ", ".join(
            f"{name} {value:.5f}" for name, value in agreement.items())
    report(title, ("library", "tower", "precision", "compile", "batch-1 ms", "batch", "items/s", "× hf"), cells, 2,
           {"environment": env, "parity_relative_max_diff_fp32": differences,
            f"least_cosine_{precision}_to_transformers_fp32": agreement, "results": rows}, args.output)

if __name__ == "__main__":
    main()

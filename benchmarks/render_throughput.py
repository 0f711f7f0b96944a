"""CLIPPO text rendering throughput on one CPU thread: texts per second at 224 px, for
``render_texts`` (uint8 [N, H, W]), ``TextRenderer.batch`` (float32 [N, 3, H, W] in [-1, 1]) and
``TextRenderer.__call__`` (float32 [3, H, W], one text at a time, as in a DataLoader worker);
``TextRenderer.batch`` also into a reused ``out`` buffer.

Four kinds of text: short captions (~40 characters), COCO-like (~60), long (~300, about 9 of the
14 lines) and CJK (~40 characters of 16-px glyphs). The texts are synthetic but vary, so no
result is cached. Each measurement is the best of ``--repeats`` passes over ``--texts`` texts in
batches of ``--batch-size``. The float batch is bound by writing 600 KB of freshly allocated
memory per text (page faults), not by rendering; ship uint8 and convert on the GPU
(``openalign.data.render.value_range``) where that matters.

    python benchmarks/render_throughput.py

Prints a table and writes JSON (``--output``, default runs/benchmarks/render_throughput.json).
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from common import add_output, environment, report
from openalign.data.render import TextRenderer, Unifont, render_texts

WORDS = ("a man woman dog cat riding sitting on top of the with next to wave surfboard beach table plate food "
         "street sign red blue large small two people standing in front building field grass playing frisbee "
         "train tracks kitchen pizza bus parked near water boat young girl holding umbrella").split()
CJK = ("一个男人在海滩上骑着冲浪板的女人和狗坐在桌子旁边"
       "吃披萨红色公共汽车停在街道上两只猫正在草地玩飞盘")


def captions(count: int, length: int, generator: random.Random) -> list[str]:
    """``count`` English-like captions of about ``length`` characters."""
    texts = []
    for _ in range(count):
        words: list[str] = []
        while sum(len(word) + 1 for word in words) < length:
            words.append(generator.choice(WORDS))
        text = " ".join(words)
        texts.append(text[0].upper() + text[1:] + ".")
    return texts


def cjk_texts(count: int, length: int, generator: random.Random) -> list[str]:
    return ["".join(generator.choice(CJK) for _ in range(length)) for _ in range(count)]


def throughput(function: Callable[[Sequence[str]], Any], texts: list[str], batch_size: int, repeats: int) -> float:
    """Texts per second, best of ``repeats`` passes."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for index in range(0, len(texts), batch_size):
            function(texts[index:index + batch_size])
        best = min(best, time.perf_counter() - start)
    return len(texts) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=224)
    add_output(parser, "render_throughput")
    args = parser.parse_args()
    torch.set_num_threads(1)
    generator = random.Random(0)
    start = time.perf_counter()
    Unifont.load()
    load_seconds = time.perf_counter() - start
    renderer = TextRenderer(image_size=args.image_size)
    workloads = {
        "short": captions(args.texts, 40, generator),
        "COCO-like": captions(args.texts, 60, generator),
        "long": captions(args.texts, 300, generator),
        "CJK": cjk_texts(args.texts, 40, generator),
    }
    rows: list[dict[str, Any]] = []
    for name, texts in workloads.items():
        uint8 = throughput(lambda batch: render_texts(batch, image_size=args.image_size), texts, args.batch_size,
                           args.repeats)
        floats = throughput(renderer.batch, texts, args.batch_size, args.repeats)
        sizes = {args.batch_size, len(texts) % args.batch_size}
        buffers = {size: torch.empty(size, 3, args.image_size, args.image_size) for size in sizes}
        reused = throughput(lambda batch: renderer.batch(batch, out=buffers[len(batch)]), texts, args.batch_size,
                            args.repeats)
        single = throughput(lambda batch: [renderer(text) for text in batch], texts, args.batch_size, args.repeats)
        rows.append({"texts": name, "mean_chars": sum(map(len, texts)) / len(texts),
                     "render_texts_per_s": uint8, "text_renderer_batch_per_s": floats,
                     "text_renderer_batch_reused_out_per_s": reused,
                     "text_renderer_call_per_s": single})

    env = environment(torch.device("cpu"), image_size=args.image_size, batch_size=args.batch_size,
                      font_load_seconds=load_seconds, font=Unifont.load().paths)
    rates = ("render_texts_per_s", "text_renderer_batch_per_s", "text_renderer_batch_reused_out_per_s",
             "text_renderer_call_per_s")
    cells = [(row["texts"], f"{row['mean_chars']:.0f}", *(f"{row[rate]:,.0f}" for rate in rates)) for row in rows]
    print("render_texts: uint8 [N, H, W]; batch: TextRenderer.batch, float32 [N, 3, H, W]; "
          "batch(out=): the same into a reused buffer; call: TextRenderer(text), float32 [3, H, W]")
    report(f"texts/s on one CPU thread, {args.image_size} px, batches of {args.batch_size}",
           ("texts", "chars", "render_texts/s", "batch/s", "batch(out=)/s", "call/s"), cells, 1,
           {"environment": env, "results": rows}, args.output)


if __name__ == "__main__":
    main()

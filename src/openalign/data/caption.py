"""Synthetic captions for webdataset shards: ALIP's second text per image (spec ``alip.md`` §5).

ALIP pairs every YFCC15M image with its raw text *and* one synthetic caption written by the
OFA-Base caption checkpoint (``caption_base_best.pt``: beam 5, ``max_len_b=16``,
``no_repeat_ngram_size=3``, fp16, 480x480 input, one caption per image). OFA is not in
``transformers``, so :func:`caption_shards` stands in for that step with any captioning model
that ``transformers.AutoModelForImageTextToText`` loads: BLIP (``Salesforce/blip-image-captioning-base``),
BLIP-2, GIT (``microsoft/git-base-coco``), ``VisionEncoderDecoder`` captioners
(``nlpconnect/vit-gpt2-image-captioning``), ... Settings close to ALIP's are::

    openalign data caption 'shards/{00000..00999}.tar' --captioner Salesforce/blip-image-captioning-base \\
        --out shards_captioned  # the defaults: --num-beams 5 --max-new-tokens 16 --no-repeat-ngram-size 3

(OFA's ``max_len_b=16`` counts generated BPE tokens, like ``--max-new-tokens``; the captions are
in the same COCO style because BLIP and GIT ``-coco`` checkpoints are also COCO-fine-tuned.)
Generation is deterministic (greedy or beam search, never sampling); on a GPU it runs under
bf16 autocast (fp16 where bf16 is unsupported), like OFA's fp16.

**Shards.** Input shards are tar files as img2dataset writes them: ``KEY.jpg`` (or ``.png``,
``.webp``, ...), ``KEY.txt``, optional ``KEY.json``, grouped by key like webdataset does
(consecutive members sharing the part of the name before the first dot). Each output shard has
the input's file name and every input member, in order, byte for byte with its mtime, mode and
owner, plus ``KEY.<field>.txt`` (default ``KEY.caption.txt``, UTF-8, whitespace collapsed) right
after the sample's last member, which webdataset reads as the sample's ``caption.txt`` field.

**Skipped samples.** A sample without an image member, or whose image PIL cannot decode
(corrupt or truncated bytes), or whose generated caption is empty (the captioner wrote only
special tokens), is copied without a caption member and counted (by reason, with its key) in
the summary; it never stops the job. ``openalign data caption`` exits with status 2 when no
sample got a caption.

**Unreadable shards.** A shard that is not a readable tar (truncated mid-member, missing its
end-of-archive blocks, not a tar at all) is *skipped*: its error is logged and recorded under
``failed_shards`` in the summary, nothing is written for it, and the other shards go on, so a
long job is not lost to one bad file. ``openalign data caption`` then exits with status 2
naming those shards; a rerun retries them.

**Resuming.** Each output shard is written to ``<name>.tmp`` in the output directory and renamed
to ``<name>`` once complete, so an existing ``<name>`` was a whole shard: a rerun skips it (and
logs that) and overwrites any leftover ``.tmp``. The model is only loaded if a shard needs it.
``captions.json`` in the output directory is rewritten after every shard: the captioner, the
generation settings and per-shard counts, with each output's size and its source's size and
SHA-256 of its first 64 KiB. A rerun into a directory whose ``captions.json`` records a different
captioner or generation settings is refused rather than mixing captions. Before captioning
anything, a rerun checks every existing output: one of another size than written (damaged
since) is captioned again, with a warning; one captioned from another source file of the same
name (a different shard, or the same path with new content) stops the job with an error naming
both. An output the summary does not know (the summary was lost) is read whole: a damaged one is
captioned again, one whose members are not its source's stops the job. Two jobs must not write
the same shard at the same time.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import os
import re
import tarfile
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from ..errors import OpenAlignError
from ..files import written_whole
from .shards import (READ_ERRORS, ShardReadError, TarSample, decode_image, expand_shards, member_key,
                     read_samples)

log = logging.getLogger(__name__)

SUMMARY_NAME = "captions.json"
TMP_SUFFIX = ".tmp"
# The settings that change what a caption says; a resumed run must use the same ones.
_SETTING_KEYS = ("captioner", "field", "max_new_tokens", "num_beams", "no_repeat_ngram_size", "prompt")


# ----------------------------------------------------------------------------------------- captioner


def _load_model(name: str, auto_class: Any) -> Any:
    """The model through ``auto_class``; on transformers 4.x, whose image-text-to-text mapping lacks some
    captioners, through ``AutoModelForVision2Seq`` (gone in 5.x) when the first does not know the config."""
    import transformers

    try:
        return auto_class.from_pretrained(name)
    except ValueError:
        fallback = getattr(transformers, "AutoModelForVision2Seq", None)
        if fallback is None:
            raise
        return fallback.from_pretrained(name)


class Captioner:
    """A ``transformers`` captioning model: a list of PIL images in, one caption string per image out.

    Loads with ``AutoModelForImageTextToText`` (in transformers 5 the home of BLIP, BLIP-2, GIT,
    ``VisionEncoderDecoder``, Pix2Struct, ...; the ``image-to-text`` pipeline and
    ``AutoModelForVision2Seq`` are gone) and ``AutoProcessor``; for models without a processor
    class (``VisionEncoderDecoder``, where ``AutoProcessor`` returns just the tokenizer) the
    ``AutoImageProcessor`` and ``AutoTokenizer`` from the same directory or hub id.

    ``prompt`` is a caption prefix ("a picture of" for BLIP) or a task prompt (Florence-2's
    ``<CAPTION>``) passed as the processor's text; it starts the decoder for
    ``VisionEncoderDecoder``. Prefix prompts reappear in the decoded caption, as in the models'
    own examples.
    """

    def __init__(self, name: str, device: str = "auto", max_new_tokens: int = 16, num_beams: int = 5,
                 prompt: str | None = None, no_repeat_ngram_size: int = 3) -> None:
        import torch
        from transformers import (AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer,
                                  ProcessorMixin)

        from ..distributed import resolve_device

        self.device = resolve_device(device)
        self.prompt = prompt or None
        self.generate_kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "num_beams": num_beams,
                                                "do_sample": False}
        if no_repeat_ngram_size:
            self.generate_kwargs["no_repeat_ngram_size"] = no_repeat_ngram_size
        try:
            self.model = _load_model(name, AutoModelForImageTextToText)
            processor = AutoProcessor.from_pretrained(name)
            if isinstance(processor, ProcessorMixin):
                self.processor, self.tokenizer = processor, processor.tokenizer
            else:  # no processor class: AutoProcessor fell back to a tokenizer or an image processor
                self.processor = AutoImageProcessor.from_pretrained(name)
                self.tokenizer = AutoTokenizer.from_pretrained(name)
        except ValueError as error:
            if "Unrecognized configuration class" not in str(error):  # e.g. a malformed hub id
                raise OpenAlignError(f"could not load captioner '{name}': {error}") from None
            raise OpenAlignError(f"captioner '{name}' is not an image-captioning model: transformers has no "
                                 f"AutoModelForImageTextToText class for its config ({str(error).splitlines()[0]})"
                                 ) from None
        except OSError as error:
            raise OpenAlignError(f"could not load captioner '{name}': it is not a local model directory and "
                                 f"not reachable on the Hugging Face hub: {error}") from None
        self.model.to(self.device).eval()
        self.model_type = self.model.config.model_type
        self.encoder_decoder = bool(self.model.config.is_encoder_decoder)
        if self.prompt and not isinstance(self.processor, ProcessorMixin) and not self.encoder_decoder:
            raise OpenAlignError(f"captioner '{name}' takes no text prompt; drop --prompt")
        self.autocast_dtype = None
        if self.device.type == "cuda":
            self.autocast_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    @property
    def dtype_name(self) -> str:
        return str(self.autocast_dtype or self.model.dtype).removeprefix("torch.")

    def _inputs(self, images: list[Any]) -> dict[str, Any]:
        import torch
        from transformers import ProcessorMixin

        if self.prompt and isinstance(self.processor, ProcessorMixin):
            inputs = dict(self.processor(images=images, text=[self.prompt] * len(images), return_tensors="pt"))
            if self.model_type == "git":  # GIT's processor ends the prompt with [SEP]: generation would start after it
                ids = inputs["input_ids"]
                if ids.shape[1] > 1 and bool((ids[:, -1] == self.tokenizer.sep_token_id).all()):
                    inputs["input_ids"] = ids[:, :-1]
                    if "attention_mask" in inputs:
                        inputs["attention_mask"] = inputs["attention_mask"][:, :-1]
        else:
            inputs = dict(self.processor(images=images, return_tensors="pt"))
            if self.prompt:  # an encoder-decoder without a processor: the prompt starts the decoder
                start = self.model.generation_config.decoder_start_token_id
                if start is None:
                    start = self.model.config.decoder_start_token_id
                ids = [start, *self.tokenizer(self.prompt, add_special_tokens=False)["input_ids"]]
                inputs["decoder_input_ids"] = torch.tensor([ids] * len(images))
        inputs.pop("token_type_ids", None)  # no captioner's generate() takes it; BLIP and GIT reject it
        return {key: value.to(self.device) if isinstance(value, torch.Tensor) else value
                for key, value in inputs.items()}

    def __call__(self, images: list[Any]) -> list[str]:
        import torch

        if not images:
            return []
        inputs = self._inputs(images)
        autocast = (torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype
                    else nullcontext())
        with torch.no_grad(), autocast:
            generated = self.model.generate(**inputs, **self.generate_kwargs)
        texts = self.tokenizer.batch_decode(generated, skip_special_tokens=True)
        return [" ".join(text.split()) for text in texts]


# ------------------------------------------------------------------------------------------ the job


def _tar_mode(name: str, write: bool) -> str:
    if not write:
        return "r:*"
    return "w:gz" if name.endswith((".tar.gz", ".tgz")) else "w"


def _caption_member(sample: TarSample, image_info: tarfile.TarInfo, field: str,
                    caption: str) -> tuple[tarfile.TarInfo, bytes]:
    data = caption.encode("utf-8")
    info = tarfile.TarInfo(f"{sample.key}.{field}.txt")
    info.size = len(data)
    info.mtime, info.mode = image_info.mtime, image_info.mode
    info.uid, info.gid, info.uname, info.gname = image_info.uid, image_info.gid, image_info.uname, image_info.gname
    return info, data


def _write_sample(tar: tarfile.TarFile, sample: TarSample, extra: tuple[tarfile.TarInfo, bytes] | None) -> None:
    for info, data in [*sample.members, *([extra] if extra else [])]:
        info = copy.copy(info)
        tar.addfile(info, io.BytesIO(data) if data is not None else None)


def _caption_shard(source: Path, tmp: Path, captioner: Captioner, batch_size: int, field: str) -> dict[str, Any]:
    """Write ``source`` with captions to ``tmp``; the shard's counts. Raises :class:`ShardReadError`."""
    counts: dict[str, Any] = {"source": str(source), WHOLE_COPY: True, "samples": 0, "captioned": 0, "skipped": 0,
                              "skipped_no_image": [], "skipped_undecodable": [], "skipped_empty_caption": []}
    start = time.perf_counter()

    def flush(batch: list[TarSample], tar_out: tarfile.TarFile) -> None:
        images, owners = [], []
        for index, sample in enumerate(batch):
            if sample.key is None:
                continue
            found = sample.image()
            if found is None:
                counts["skipped_no_image"].append(sample.key)
                continue
            image = decode_image(found[1])
            if image is None:
                log.warning("%s: cannot decode %s; copying the sample without a caption", source.name, found[0].name)
                counts["skipped_undecodable"].append(sample.key)
                continue
            images.append(image)
            owners.append((index, found[0]))
        texts = captioner(images)
        captions = {index: (info, text) for (index, info), text in zip(owners, texts, strict=True) if text}
        counts["skipped_empty_caption"] += [batch[index].key for (index, _), text in zip(owners, texts) if not text]
        for index, sample in enumerate(batch):
            extra = None
            if index in captions:
                image_info, caption = captions[index]
                extra = _caption_member(sample, image_info, field, caption)
            _write_sample(tar_out, sample, extra)
        counts["samples"] += sum(sample.key is not None for sample in batch)
        counts["captioned"] += len(captions)

    try:
        counts["source_fingerprint"] = _fingerprint(source)
        tar_in = tarfile.open(source, _tar_mode(source.name, write=False))
    except (tarfile.TarError, EOFError, OSError) as error:
        raise ShardReadError(f"{type(error).__name__}: {error}") from error
    with tar_in, tarfile.open(tmp, _tar_mode(source.name, write=True)) as tar_out:
        batch: list[TarSample] = []
        for sample in read_samples(tar_in, keep_ignored=True):  # copied whole: ._a.jpg and README too
            if f"{field}.txt" in sample.fields():
                raise OpenAlignError(f"shard {source} already has a '{sample.key}.{field}.txt' member: choose "
                                     "another --field (it names the new member KEY.<field>.txt)")
            batch.append(sample)
            if sum(s.key is not None for s in batch) >= batch_size:
                flush(batch, tar_out)
                batch = []
        flush(batch, tar_out)
    with open(tmp, "rb+") as written:
        os.fsync(written.fileno())
    counts["output_bytes"] = tmp.stat().st_size
    if empty := counts["skipped_empty_caption"]:
        log.warning("%s: the captioner wrote an empty caption for %d image(s) (first: %s); they are copied without one",
                    source.name, len(empty), empty[0])
    counts["skipped"] = sum(len(counts[key]) for key in counts if key.startswith("skipped_"))
    counts["seconds"] = round(time.perf_counter() - start, 3)
    return counts


def _fingerprint(path: Path) -> dict[str, Any]:
    """A cheap identity of a source shard: its size and the SHA-256 of its first 64 KiB (the first
    members' names, which hold the shard's own keys, and bytes), so that a rerun notices another
    file of the same name without reading every finished shard again (10,000 shards: 640 MB)."""
    with open(path, "rb") as file:
        head = file.read(1 << 16)
    return {"bytes": path.stat().st_size, "head_sha256": hashlib.sha256(head).hexdigest()}


def _members(path: Path) -> list[tarfile.TarInfo]:
    """A whole tar's members in order. Raises :class:`ShardReadError` (cut, damaged)."""
    try:
        with tarfile.open(path, "r:*") as tar:
            return [info for sample in read_samples(tar) for info, _ in sample.members]
    except READ_ERRORS as error:
        raise ShardReadError(f"{type(error).__name__}: {error}") from error


# in a summary entry: the output copies every member with its bytes (earlier versions wrote the header alone of
# a member webdataset ignores, a tar no reader may get past): without it, a source with such members is captioned
# again
WHOLE_COPY = "copies_every_member"


def _ignored_bytes(source: Path) -> bool:
    """Whether ``source`` holds a file member with bytes that webdataset ignores (no key)."""
    try:
        with tarfile.open(source, "r:*") as tar:
            return any(info.isfile() and info.size > 0 and member_key(info) is None for info in tar)
    except READ_ERRORS:
        return True  # unreadable now: captioning it again says so


def _finished_entry(source: Path, destination: Path, entry: dict[str, Any] | None,
                    field: str) -> dict[str, Any] | None:
    """The summary entry of an existing output shard a rerun keeps, or None where it is damaged and
    must be captioned again. Raises :class:`OpenAlignError` where it was made from another file."""
    other_file = (f"{destination} was captioned from another file than {source}: caption into a new --out, "
                  f"or delete {destination} to caption {source} into it")
    if entry is not None and "output_bytes" in entry:
        if entry.get("source_fingerprint") != _fingerprint(source):
            raise OpenAlignError(f"{other_file} (it was {entry.get('source')}, "
                                 f"{entry.get('source_fingerprint', {}).get('bytes')} bytes)")
        if not entry.get(WHOLE_COPY) and _ignored_bytes(source):
            log.warning("%s was written by an earlier version, which left out the bytes of the members webdataset "
                        "ignores (a README, a ._ file); captioning %s again", destination, source)
            return None
        size = destination.stat().st_size
        if size == entry["output_bytes"]:
            return {**entry, WHOLE_COPY: True}  # (an earlier version's, of a source without such members)
        log.warning("%s is %d bytes, not the %d bytes written: it is damaged; captioning %s again",
                    destination, size, entry["output_bytes"], source)
        return None
    # Not in the summary (it was lost, or the shard was written just before a kill): read it whole.
    try:
        members = _members(destination)
    except ShardReadError as error:
        log.warning("%s cannot be read (%s); captioning %s again", destination, error, source)
        return None
    fields = [member_key(info) for info in members]
    copied = [info.name for info, found in zip(members, fields) if not (found and found[1] == f"{field}.txt")]
    try:
        source_names = [info.name for info in _members(source)]
    except ShardReadError as error:
        log.warning("keeping %s: it is whole, but %s cannot be read to check it was made from it (%s)",
                    destination, source, error)
        source_names = copied
    if copied != source_names:
        raise OpenAlignError(f"{other_file} (its members are not {source}'s)")
    keys = {found[0] for found in fields if found}
    captioned = sum(bool(found and found[1] == f"{field}.txt") for found in fields)
    # recorded now as a whole output is, so that the next rerun checks it without reading it again; an older
    # version's entry keeps its details (the skipped keys, the time)
    return {**(entry or {}), WHOLE_COPY: True, "source": str(source), "source_fingerprint": _fingerprint(source),
            "samples": len(keys), "captioned": captioned, "skipped": len(keys) - captioned,
            "output_bytes": destination.stat().st_size, **({} if entry else {"recounted": True})}


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    with written_whole(path) as temporary:
        temporary.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _totals(summary: dict[str, Any]) -> dict[str, int]:
    shards = summary["shards"].values()
    return {"shards": len(summary["shards"]), "failed_shards": len(summary["failed_shards"]),
            **{key: sum(entry.get(key, 0) for entry in shards) for key in ("samples", "captioned", "skipped")}}


def caption_shards(shards: Sequence[str], captioner: str, out: str | Path, batch_size: int = 16,
                   device: str = "auto", max_new_tokens: int = 16, num_beams: int = 5, prompt: str | None = None,
                   field: str = "caption", show_progress: bool = True,
                   no_repeat_ngram_size: int = 3) -> dict[str, Any]:
    """Write a copy of each shard to ``out`` with a synthetic ``KEY.<field>.txt`` caption per image.

    ``shards`` are paths, globs or brace patterns; ``captioner`` a model directory or hub id that
    ``AutoModelForImageTextToText`` loads (see :class:`Captioner`). The generation defaults are
    ALIP's OFA settings: beam 5, 16 new tokens, no repeated trigrams (``num_beams=1`` and
    ``no_repeat_ngram_size=0`` give greedy decoding, several times faster).
    Shards already in ``out`` are skipped, so an interrupted job resumes; shards that cannot be
    read are skipped and listed under ``failed_shards`` (see the module docstring).

    Returns the summary also written to ``out/captions.json``: ``captioner``, ``field``,
    ``generation`` settings, ``shards`` (per output file: ``samples``, ``captioned``, ``skipped``,
    and the keys skipped for having no image, an undecodable one or an empty caption), ``failed_shards`` (name:
    source and error) and ``totals``.
    """
    from ..progress import progress_bar

    if batch_size < 1 or max_new_tokens < 1 or num_beams < 1 or no_repeat_ngram_size < 0:
        raise OpenAlignError("--batch-size, --max-new-tokens and --num-beams must be at least 1 "
                             "(--no-repeat-ngram-size at least 0)")
    if not field or not re.fullmatch(r"[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*", field) or field == "txt":
        raise OpenAlignError(f"--field '{field}' must be a name like 'caption' (letters, digits, _ and -), "
                             "not 'txt' (the raw text's field)")
    sources = expand_shards(shards)
    out = Path(out)
    by_name: dict[str, Path] = {}
    for source in sources:
        if source.name in by_name:
            raise OpenAlignError(f"shards {by_name[source.name]} and {source} have the same file name; "
                                 "caption them into different --out directories")
        by_name[source.name] = source
        if (out / source.name).resolve() == source.resolve():
            raise OpenAlignError(f"--out {out} is the shards' own directory: choose another one")
    out.mkdir(parents=True, exist_ok=True)

    if Path(captioner).expanduser().is_dir():  # a local model: record where it is, whatever the working directory
        captioner = str(Path(captioner).expanduser().resolve())
    settings = {"captioner": str(captioner), "field": field, "max_new_tokens": max_new_tokens,
                "num_beams": num_beams, "no_repeat_ngram_size": no_repeat_ngram_size, "prompt": prompt or None}
    summary_path = out / SUMMARY_NAME
    previous: dict[str, Any] = {}
    if summary_path.is_file():
        try:
            previous = json.loads(summary_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            log.warning("ignoring unreadable %s", summary_path)
        recorded = {key: previous.get("generation", {}).get(key, previous.get(key)) for key in _SETTING_KEYS}
        if previous and recorded != settings:
            raise OpenAlignError(f"{out} holds shards captioned with other settings ({recorded}); caption into a "
                                 f"new --out, or rerun with the same settings to resume")
    summary: dict[str, Any] = {
        "captioner": settings["captioner"], "field": field, "member_suffix": f".{field}.txt",
        "generation": {key: settings[key] for key in _SETTING_KEYS if key not in ("captioner", "field")},
        "batch_size": batch_size, "device": None, "dtype": None,
        "shards": dict(previous.get("shards", {})), "failed_shards": dict(previous.get("failed_shards", {})),
    }
    for key in ("device", "dtype"):
        summary[key] = previous.get(key)

    finished: dict[str, dict[str, Any]] = {}  # checked before any captioning: a wrong file stops the job first
    for source in sources:
        if (out / source.name).exists():
            entry = _finished_entry(source, out / source.name, summary["shards"].get(source.name), field)
            if entry is not None:
                finished[source.name] = entry

    model: Captioner | None = None
    with progress_bar("captioning shards", total=len(sources), enabled=show_progress) as advance:
        for source in sources:
            destination, tmp = out / source.name, out / (source.name + TMP_SUFFIX)
            if source.name in finished:
                log.info("skipping %s: %s already exists", source, destination)
                summary["failed_shards"].pop(source.name, None)
                summary["shards"][source.name] = finished[source.name]
                advance()
                continue
            if model is None:
                model = Captioner(captioner, device, max_new_tokens, num_beams, prompt, no_repeat_ngram_size)
                summary["device"], summary["dtype"] = str(model.device), model.dtype_name
            try:
                counts = _caption_shard(source, tmp, model, batch_size, field)
            except ShardReadError as error:
                tmp.unlink(missing_ok=True)
                log.error("skipping shard %s: it cannot be read (%s)", source, error)
                summary["failed_shards"][source.name] = {"source": str(source), "error": str(error)}
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            else:
                os.replace(tmp, destination)
                summary["failed_shards"].pop(source.name, None)
                summary["shards"][source.name] = counts
                log.info("%s: captioned %d of %d samples (%d skipped)", destination, counts["captioned"],
                         counts["samples"], counts["skipped"])
            summary["totals"] = _totals(summary)
            _write_json(summary_path, summary)
            advance()
    summary["totals"] = _totals(summary)
    _write_json(summary_path, summary)
    return summary

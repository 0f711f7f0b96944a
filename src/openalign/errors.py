"""Exceptions for mistakes in user input, which the CLI reports without a traceback."""

from __future__ import annotations


class OpenAlignError(Exception):
    """A problem with user input (a config, a path, a dataset, a checkpoint) that the user can fix."""


def first_line(error: BaseException) -> str:
    """The first line of ``error``'s message (a library's may span many), or its type's name."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class ConfigError(OpenAlignError, ValueError):
    """A config key or value is wrong; the message names the key and the fix.

    ``key`` is the dotted key the problem is about, relative to the settings object that raised
    it (the config loader prefixes the object's own path); ``message`` then reads as a
    predicate of it: ``config key 'train.lr' must be positive``. ``unknown``: whether the key is
    one the settings object does not have (rather than a wrong value of one it has).
    """

    def __init__(self, message: str, key: str | None = None, unknown: bool = False) -> None:
        self.key = key
        self.message = message
        self.unknown = unknown
        super().__init__(f"config key '{key}' {message}" if key else message)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's preemption, torchrun passing it on), raised in the main thread as Ctrl-C's
    KeyboardInterrupt is, so that the same clean-up runs (loader workers stopped, the run's lock
    released, no agreement asked of other ranks). Training raises it once it has checkpointed the
    step it stopped after; its message then says which. ``received``: whether a SIGTERM was raised
    so, for an error raised while the command unwinds; ``requested``: whether one asked training to
    stop after its step, for an error raised before it does (a loader worker the signal ended)."""

    received = False
    requested = False

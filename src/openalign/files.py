"""Reading weight, state and JSON files, with one clear error for a truncated or corrupt file.

A download cut short or a checkpoint written while the disk filled up fails here with the file's
path and what to do, instead of the storage library's own exception from deep in a load.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import pickle
import shutil
import socket
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import OpenAlignError

if TYPE_CHECKING:  # torch is imported where used: the configs and the command line's parser read no weights
    import torch

log = logging.getLogger(__name__)


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | Path,
                      metadata: dict[str, str] | None = None) -> None:
    """``tensors`` saved to ``path`` readable as the process's other files are (``0666`` less the
    umask): safetensors creates its files ``0600``, which colleagues on a shared file system
    cannot load."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    """The process's umask, read (Linux) rather than set and set back: another thread creating a
    file in between would get it unmasked."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status", encoding="ascii") as status:
            return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise OpenAlignError(f"'{path}' is truncated or corrupt ({error}): copy or download it again") from None


def read_torch_file(path: str | Path) -> Any:
    """A ``torch.save`` file, loaded with ``weights_only`` so that no pickled code runs."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # weights_only refused an object: never load it otherwise
        # torch's own words after "WeightsUnpickler error:" name what was refused ("Unsupported global:
        # GLOBAL print ...") or, for bytes that are no pickle at all, "Unsupported operand 110"
        text = str(error).partition("WeightsUnpickler error:")[2]
        refused = next((line.strip().split(". ")[0] for line in text.splitlines() if line.strip()), "")
        # a global of a module torch blocks outright (os.system, as posix.system) comes in other words
        blocked = [line.strip().rstrip(".") for line in str(error).splitlines() if "unsupported GLOBAL" in line]
        refused = blocked[0] if blocked and not refused else refused
        if not refused.startswith(("Unsupported global", "Trying to load unsupported GLOBAL")):
            raise OpenAlignError(f"'{path}' is truncated or corrupt, or not a torch.save file "
                                 f"({refused or type(error).__name__}): copy or download it again") from None
        raise OpenAlignError(f"'{path}' holds more than tensors ({refused}); openalign loads weights only "
                             "with weights_only, so that no pickled code runs: save its state dict alone") from None
    except (RuntimeError, EOFError, OSError, IndexError, KeyError, ValueError) as error:  # what torch's readers raise
        if "legacy .tar format" in str(error):  # a tar archive: torch's oldest format, which only unpickling reads
            raise OpenAlignError(f"'{path}' is a tar archive, not a weights file openalign reads (torch's "
                                 "legacy .tar checkpoints need pickled code run to load, which openalign never "
                                 "does)") from None
        # torch's first sentence only: its advice on weights_only=False is not one openalign follows
        reason = ": ".join([type(error).__name__, *str(error).strip().splitlines()[:1]]).split(". ")[0]
        raise OpenAlignError(f"'{path}' is truncated or corrupt, or not a torch.save file ({reason}): copy or "
                             "download it again") from None


def not_a_file(path: str | Path) -> str:
    """Why ``path``, which is not a regular file, cannot be read as one: it does not exist, is a
    directory, a broken link, or something else (a FIFO, a device)."""
    path = Path(path)
    if path.is_dir():
        return "is a directory, not a file"
    if path.exists():
        return "is not a regular file"
    return "is a broken symbolic link" if path.is_symlink() else "does not exist"


def printable(name: str | Path) -> str:
    """``name`` as valid UTF-8: a file name's undecodable bytes (surrogate escapes) as ``\\xNN``,
    so that a log line or a file can hold it."""
    name = str(name)
    try:
        name.encode()
        return name
    except UnicodeEncodeError:
        return name.encode(errors="surrogateescape").decode(errors="backslashreplace")


def read_json(path: str | Path) -> Any:
    """A JSON file's value."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8-sig"))  # a byte-order mark is no JSON error
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise OpenAlignError(f"cannot read '{path}': {error}") from None


def replaceable(output: Path, written_by_us: Callable[[Path], bool], what: str) -> Path:
    """``output``, unless it is a file that openalign did not write (``written_by_us`` says no): a
    dataset JSON, a model's config or an image named as an output by mistake is refused, not replaced."""
    if output.is_file() and not written_by_us(output):
        raise OpenAlignError(f"'{output}' exists and is not {what}, which is all this command replaces: choose "
                             "another file")
    return output


def starts_with(opening: bytes) -> Callable[[Path], bool]:
    """A test of whether a file begins with ``opening`` (for :func:`replaceable`)."""
    def check(path: Path) -> bool:
        with open(path, "rb") as file:
            return file.read(len(opening)) == opening
    return check


@contextlib.contextmanager
def written_whole(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; when the block completes it replaces ``path``
    in one rename, so that readers (other ranks, a resumed job) see the old file or the whole new
    one, never half of one. When the block raises, the temporary file is removed. The name is
    unique across processes and hosts, so ranks sharing a filesystem never write into one file."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


@contextlib.contextmanager
def filled_whole(directory: str | Path, replaces: Iterable[str] = ()) -> Iterator[Path]:
    """A temporary folder inside ``directory`` (created if need be, through symlinks and mount
    points: the same filesystem) to write files into. When the block completes, the new files
    replace their namesakes, one rename each, and the files named in ``replaces`` that the block
    did not write are removed (a folder of such a name stays); other files stay. When the block
    raises, ``directory`` is as it was (folders created for it removed): a refused or failed save
    never costs the model there, and at no moment is a file of it gone before its replacement is
    in place."""
    directory = Path(directory).expanduser().resolve()
    created = [folder for folder in (directory, *directory.parents) if not folder.exists()]
    directory.mkdir(parents=True, exist_ok=True)
    staging = directory / f".openalign-staging-{uuid.uuid4().hex}"
    staging.mkdir()
    completed = False
    try:
        yield staging
        written = {path.name for path in staging.iterdir()}
        for name in written:
            os.replace(staging / name, directory / name)
        for name in sorted(set(replaces) - written):
            if (directory / name).is_file() or (directory / name).is_symlink():  # never a folder of that name
                (directory / name).unlink()
        completed = True
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if not completed:
            for folder in created:  # deepest first; only what is still empty
                with contextlib.suppress(OSError):
                    folder.rmdir()


LOCK_FILE = ".openalign.lock"
_HELD: dict[Path, int] = {}  # the directories this process holds, and how many blocks hold each


@contextlib.contextmanager
def held_directory(directory: Path, what: str) -> Iterator[None]:
    """Hold ``directory`` (created if need be) for the block, so that another process asking for it
    is refused with ``what`` and the holder's process and host: a POSIX lock on ``.openalign.lock``
    inside it (``lockf``: per process, so DataLoader workers forked meanwhile do not keep it, and
    it goes when the process ends, however it ends; NFS has it). Blocks of one process nest (the
    demo holds its folder around the run it trains). A folder the block created, left holding the
    lock file alone when the block raises (a refused run), is removed. Where the file system or
    the system has no such locks (Windows, Lustre without ``flock``), nothing is held: a warning."""
    key = directory.expanduser().resolve()
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    try:
        import fcntl
    except ImportError:
        yield
        return
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    handle = open(directory / LOCK_FILE, "a+", encoding="utf-8")
    try:
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EACCES, errno.EAGAIN):  # no locks here: run unguarded, and say so
                log.warning("cannot lock '%s' (%s): nothing stops a second run from using %s '%s' meanwhile",
                            directory / LOCK_FILE, error.strerror or error, what, directory)
            else:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                raise OpenAlignError(f"{what} '{directory}' is in use by another openalign run ({holder}): wait for "
                                     "it to finish, or choose another") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        _HELD[key] = 1
        try:
            yield
        except BaseException:
            with contextlib.suppress(OSError):  # the block's error is the one to report
                if created and [path.name for path in directory.iterdir()] == [LOCK_FILE]:
                    shutil.rmtree(directory, ignore_errors=True)  # a refused run leaves no folder behind
            raise
        finally:
            del _HELD[key]
    finally:
        handle.close()  # the lock goes with it (a POSIX lock goes with any of the process's handles on the file)

"""Atomic checkpoints and the random-number state they must carry for exact resumption.

A run is resumable bit for bit when the checkpoint holds everything the remaining steps read:
model parameters and buffers (spectral-norm vectors, ActNorm statistics), optimiser moments, the
step counter, the test history, and every random stream (torch's, numpy's and Python's global
generators, plus the run's own data generators). Files are written to a temporary name in the
same folder and moved into place with ``os.replace``, so a run killed while saving leaves the
previous checkpoint intact.

Checkpoints are read with ``torch.load(..., weights_only=True)``: a file can only hold tensors and
plain containers, so loading one never runs code, whoever wrote it. Random-number states are
stored as tensors and lists for that reason. A file that is not a readable checkpoint raises
:class:`CheckpointError`, naming the file and what to do about it.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import random
import signal
import socket
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Union

import numpy as np
import torch

__all__ = [
    "CheckpointError",
    "FolderBusyError",
    "atomic_write_bytes",
    "atomic_write_text",
    "save_checkpoint",
    "load_checkpoint",
    "capture_rng_state",
    "restore_rng_state",
    "StopRequest",
    "stop_on_signals",
    "FolderLock",
    "folder_holder",
    "LOCK_NAME",
]

PathLike = Union[str, os.PathLike]


def _atomic_replace(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o644)  # mkstemp creates 0600; results are meant to be shared
        os.replace(temporary, path)
    except BaseException as error:
        if os.path.exists(temporary):
            os.unlink(temporary)
        if isinstance(error, OSError) and error.filename is None:
            error.filename = str(path)  # a full disk names the file it could not write
        raise


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace``."""
    _atomic_replace(Path(path), lambda handle: handle.write(data))


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def save_checkpoint(path: PathLike, state: Dict[str, Any]) -> None:
    """``torch.save`` ``state`` to ``path`` atomically."""
    _atomic_replace(Path(path), lambda handle: torch.save(state, handle))


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: unreadable, not a monoflow checkpoint, or one whose
    content would need code to be run to load it."""


def _restart_hint(path: Path) -> str:
    return f"delete {path} to start the run afresh"


# numpy's own pickled arrays (the RNG states of checkpoints written before monoflow stored them as
# tensors): rebuilding one calls no user code, so older checkpoints stay loadable with weights_only.
_LEGACY_SAFE_GLOBALS = [np.ndarray, np.dtype, type(np.dtype(np.uint32))]
try:
    _LEGACY_SAFE_GLOBALS.append(np._core.multiarray._reconstruct)  # numpy >= 2
except AttributeError:  # pragma: no cover - numpy 1.x
    _LEGACY_SAFE_GLOBALS.append(np.core.multiarray._reconstruct)


def _reason(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else ""
    return f"{type(error).__name__}: {text}" if len(text) > 3 else type(error).__name__


def load_checkpoint(path: PathLike, map_location: Any = "cpu", required: Iterable[str] = ()) -> Dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` without running any code from it.

    Args:
        path: the checkpoint file.
        map_location: where tensors go (the CPU by default).
        required: keys the checkpoint must have (a file from another program lacks them).

    Raises:
        FileNotFoundError: there is no file at ``path``.
        CheckpointError: the file is empty, truncated, not a torch file, holds anything but
            tensors and plain containers (it could run code; it is not loaded), or lacks a
            ``required`` key. The message names the file and suggests deleting it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (a save was cut short?); {_restart_hint(path)}")
    try:
        with torch.serialization.safe_globals(_LEGACY_SAFE_GLOBALS):
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        if "global" in str(error).lower():  # it names a function or class to call
            raise CheckpointError(
                f"checkpoint {path} holds objects other than tensors and plain containers (made by an older "
                f"monoflow, or not by monoflow); it is not loaded because loading it could run code: "
                f"{_restart_hint(path)}") from None
        raise CheckpointError(f"checkpoint {path} is damaged or not a torch file (unreadable pickle data); "
                              f"{_restart_hint(path)}") from None
    except (PermissionError, IsADirectoryError):
        raise
    except Exception as error:  # any other failure to parse the file: it is damaged or foreign
        raise CheckpointError(f"checkpoint {path} is damaged or not a torch file ({_reason(error)}); "
                              f"{_restart_hint(path)}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a monoflow checkpoint (it holds a {type(state).__name__}, "
                              f"not a dictionary); {_restart_hint(path)}")
    missing = [key for key in required if key not in state]
    if missing:
        raise CheckpointError(f"{path} is not a monoflow checkpoint of this kind (no {', '.join(map(repr, missing))}"
                              f"); {_restart_hint(path)}")
    return state


def capture_rng_state(**generators: torch.Generator) -> Dict[str, Any]:
    """The global torch / numpy / Python RNG states plus the states of the named generators, as
    tensors, numbers and lists only (loadable with ``weights_only=True``)."""
    algorithm, key, position, has_gauss, cached_gaussian = np.random.get_state()
    version, python_state, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"algorithm": str(algorithm), "key": torch.from_numpy(np.asarray(key, dtype=np.int64)),
                  "position": int(position), "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "python": {"version": int(version), "state": list(python_state), "gauss_next": gauss_next},
        "generators": {name: generator.get_state() for name, generator in generators.items()},
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _numpy_state(state: Any) -> tuple:
    if isinstance(state, dict):
        key = state["key"]
        key = key.numpy() if isinstance(key, torch.Tensor) else np.asarray(key)
        return (state["algorithm"], key.astype(np.uint32), state["position"], state["has_gauss"],
                state["cached_gaussian"])
    return tuple(state)  # written before the states were stored as tensors


def _python_state(state: Any) -> tuple:
    if isinstance(state, dict):
        return (state["version"], tuple(state["state"]), state["gauss_next"])
    return (state[0], tuple(state[1]), state[2])


def restore_rng_state(state: Dict[str, Any], **generators: torch.Generator) -> None:
    """Inverse of :func:`capture_rng_state`; every named generator must be present in ``state``."""
    if not isinstance(state, dict) or not {"torch", "numpy", "python"} <= set(state):
        raise CheckpointError("the random-number state of the checkpoint is incomplete (not written by monoflow?)")
    torch.set_rng_state(state["torch"])
    np.random.set_state(_numpy_state(state["numpy"]))
    random.setstate(_python_state(state["python"]))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, generator in generators.items():
        if name not in state.get("generators", {}):
            raise ValueError(f"checkpoint has no state for generator {name!r}")
        generator.set_state(state["generators"][name])


class StopRequest:
    """Whether SIGTERM or SIGINT arrived while :func:`stop_on_signals` was active."""

    def __init__(self) -> None:
        self.requested = False
        self.signal: Union[int, None] = None


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """Within this context SIGTERM and SIGINT (a scheduler's preemption, Ctrl-C) do not kill the
    process but set ``request.requested``: a training loop checks it after each step, writes a
    checkpoint and returns. The previous handlers come back on exit; outside the main thread
    (where Python cannot install handlers) nothing is installed."""
    request = StopRequest()

    def handler(signum: int, frame: Any) -> None:  # noqa: ARG001
        request.requested, request.signal = True, signum

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread
            pass
    try:
        yield request
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


#: The lock file a training process holds in each folder it writes (ignored by git).
LOCK_NAME = ".training.lock"


def _holder(handle: Any) -> str:
    """Who holds a lock file, as its holder wrote it (``process <pid> on <host>``)."""
    handle.seek(0)
    return handle.read().strip() or "another process"


def folder_holder(folder: PathLike) -> Optional[str]:
    """Who is training in ``folder`` (``process <pid> on <host>``), or ``None`` when no process
    holds its :class:`FolderLock`. It asks with a shared lock, held for a moment and released; a
    worker that tries to take the folder in that moment skips it as busy."""
    path = Path(folder) / LOCK_NAME
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no locks are taken
        return None
    if not path.is_file():
        return None
    with open(path, "r") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return _holder(handle)
        fcntl.flock(handle, fcntl.LOCK_UN)
    return None


class FolderBusyError(RuntimeError):
    """Another process is training in a run folder (raised by :class:`FolderLock`)."""


class FolderLock:
    """An exclusive lock on run folders for as long as one process trains in them, so that a second
    process started on the same run (the same command twice) stops with an error that says so,
    instead of both writing its checkpoint. ``fcntl.flock`` on ``<folder>/.training.lock``: the
    operating system releases it when the lock is released, the object is collected, or the process
    ends in any way, so a killed run never leaves a stale lock. Without ``fcntl`` (Windows) no lock
    is taken. Use as a context manager, or keep the object and call :meth:`release`.

    Why not the ``filelock`` package: its lock would cover Windows too, but the refused process
    could not say who holds the run; this one writes the holder's process id and host into the
    lock file and names them in the error (and two workers of ``monoflow table2`` use the refusal,
    :class:`FolderBusyError`, to share one list of runs)."""

    def __init__(self, *folders: PathLike) -> None:
        self._handles: List[Any] = []
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return
        try:
            for folder in folders:
                folder = Path(folder)
                folder.mkdir(parents=True, exist_ok=True)
                handle = open(folder / LOCK_NAME, "a+")
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    holder = _holder(handle)
                    handle.close()
                    raise FolderBusyError(
                        f"{folder} is in use: {holder} is training this run. Wait for it to finish, or stop it "
                        "(SIGTERM or Ctrl-C saves its checkpoint) and rerun the command to resume") from None
                handle.seek(0)
                handle.truncate()
                handle.write(f"process {os.getpid()} on {socket.gethostname()}\n")
                handle.flush()
                self._handles.append(handle)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Release every folder (closing the file releases its lock)."""
        while self._handles:
            self._handles.pop().close()

    def __enter__(self) -> "FolderLock":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.release()

"""Run folders that never lose or mix anything: the marker, the lock, atomic writes, verified files, checkpoints.

A run folder (``--output-dir``) holds one run of one command, marked by ``minidpo_run.json``:

    {"command": "train", "state": "running" | "interrupted" | "failed" | "finished", "step": 40,
     "total_steps": 100, "config": {...DPOConfig...}, "args": {...the command line...}, "updated": "..."}

- ``check_output_dir`` refuses a foreign folder, a finished (or any other) run unless ``--overwrite``, and an
  output folder that is (or holds) one of the command's inputs, before any work is done.
- ``run_folder`` creates the folder, holds the lock (``fcntl.flock`` on ``.minidpo.lock``: the OS drops it when
  the process dies, ``kill -9`` included, so a lock is never stale), and removes the folder again when the
  command fails before its first training step.
- ``save_checkpoint`` writes ``checkpoint.tmp/`` with a manifest of sizes and checksums written last, then swaps
  it in with two renames; ``find_checkpoint`` takes the newest complete one of ``checkpoint``,
  ``checkpoint.tmp`` and ``checkpoint.old``, so a kill at any instant of the swap leaves a run that resumes.
- ``save_verified`` / ``load_verified``: a torch file with its checksum in a header, for caches that must be
  recomputed (not trusted) when damaged.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import time
from pathlib import Path

try:  # POSIX; elsewhere runs are not locked (and the docstring above does not hold)
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

RUN_MARKER = "minidpo_run.json"  # marks a folder as ours, so we may write into it again
CHECKPOINT = "checkpoint"
LOCK_FILE = ".minidpo.lock"
MANIFEST = "manifest.json"  # inside a checkpoint: step, and size + checksum of every file; written last
_MAGIC = b"minidpo-verified-1\n"  # header of a file written by save_verified


CACHE_ENV = "MINIDPO_CACHE_DIR"  # where reference log-probs (and the synthetic world) are cached


def default_cache_dir() -> str:
    """``$MINIDPO_CACHE_DIR`` when set, else ``.cache/minidpo`` in the current folder."""
    return os.environ.get(CACHE_ENV) or ".cache/minidpo"


class RunFolderError(ValueError):
    """A run folder that cannot be used as asked (the CLI prints it as one ``error:`` line, exit 2)."""


class DamagedFile(ValueError):
    """A file whose size or checksum is not what was written (truncated, overwritten, half copied)."""


# ------------------------------------------------------------------------------------------- small atomics

def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, rename it over ``path``: a reader (or a
    kill) sees the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data.encode() if isinstance(data, str) else data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _file_digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_verified(obj, path: str | os.PathLike) -> None:
    """``torch.save(obj)`` with a checksum header, written atomically (see ``load_verified``)."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    payload = buffer.getvalue()
    write_atomic(path, _MAGIC + _digest(payload).encode() + b"\n" + payload)


def load_verified(path: str | os.PathLike):
    """What ``save_verified`` wrote; ``DamagedFile`` when the file is truncated or altered."""
    import torch

    data = Path(path).read_bytes()
    head, _, rest = data.partition(b"\n")
    digest, _, payload = rest.partition(b"\n")
    if head + b"\n" != _MAGIC or _digest(payload).encode() != digest:
        raise DamagedFile(f"{path} is damaged (its checksum does not match; truncated or altered?)")
    return torch.load(io.BytesIO(payload), weights_only=True)


# ------------------------------------------------------------------------------------------------- marker

def read_marker(out: str | os.PathLike) -> dict | None:
    """The run marker of ``out``: None when there is none; {} when it is empty or unreadable (an old run)."""
    path = Path(out) / RUN_MARKER
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text() or "{}")
    except (ValueError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def update_marker(out: str | os.PathLike, **fields) -> dict:
    """Merge ``fields`` into the marker (atomically) and stamp the time; returns the new marker."""
    marker = read_marker(out) or {}
    marker.update(fields, updated=time.strftime("%Y-%m-%d %H:%M:%S"))
    write_atomic(Path(out) / RUN_MARKER, json.dumps(marker, indent=2, default=str))
    return marker


# --------------------------------------------------------------------------------------------------- lock

_held: dict[str, list] = {}  # folders this process has locked: [fd, depth]; flock is per open file, so nested
                             # holders in one process (the CLI, then train_dpo) share one descriptor


@contextlib.contextmanager
def locked(out: str | os.PathLike):
    """Hold the run folder's lock (creating the folder); ``RunFolderError`` if another process holds it."""
    out = Path(out)
    key = str(out.resolve())
    if key in _held or fcntl is None:
        if key in _held:
            _held[key][1] += 1
        try:
            yield out
        finally:
            if key in _held:
                _held[key][1] -= 1
        return
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise RunFolderError(f"{out} is in use by another minidpo run (pid {holder}); wait for it to end or "
                             "choose another --output-dir") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _held[key] = [fd, 1]
    try:
        yield out
    finally:
        _held[key][1] -= 1
        if _held[key][1] == 0:
            del _held[key]
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def _locked_by_other(out: Path) -> str | None:
    """The pid holding ``out``'s lock when another process holds it, else None (takes nothing)."""
    if fcntl is None or str(out.resolve()) in _held or not (out / LOCK_FILE).is_file():
        return None
    fd = os.open(out / LOCK_FILE, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except BlockingIOError:
        return os.read(fd, 32).decode(errors="replace").strip() or "?"
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------ the run folder

def _inside(child: Path, parent: Path) -> bool:
    child, parent = child.resolve(), parent.resolve()
    return child == parent or parent in child.parents


def check_output_dir(out: str | os.PathLike, command: str, *, resume: bool = False, overwrite: bool = False,
                     inputs: dict[str, str | None] | None = None) -> dict | None:
    """Raise ``RunFolderError`` when ``out`` may not be used as asked; touch nothing. Returns the marker.

    ``inputs``: {"--model": path, ...}; ``out`` must not be one of them or hold one (``--overwrite`` would
    delete it, and save_pretrained would replace it). ``--overwrite`` clears minidpo run folders only: a
    foreign non-empty folder is never cleared (it may hold someone's work).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"--output-dir {out} is a file, not a folder")
    for flag, path in (inputs or {}).items():
        if path and Path(path).exists() and _inside(Path(path), out):
            raise RunFolderError(f"--output-dir {out} is, or holds, the {flag} folder {path}; writing there would "
                                 "replace the input; choose another --output-dir")
    if not out.is_dir():
        if resume:
            raise RunFolderError(f"--resume {out}: no such folder")
        return None
    holder = _locked_by_other(out)
    if holder:
        raise RunFolderError(f"{out} is in use by another minidpo run (pid {holder}); wait for it to end or "
                             "choose another --output-dir")
    marker = read_marker(out)
    if resume:
        if marker is None:
            raise RunFolderError(f"--resume {out}: no minidpo run there to resume")
        if marker.get("command", command) != command:
            raise RunFolderError(f"--resume {out}: it holds a `{marker['command']}` run, not a `{command}` run")
        return marker
    if not any(p.name != LOCK_FILE for p in out.iterdir()):
        return marker
    if marker is None:
        raise RunFolderError(f"--output-dir {out} is not empty and is not a minidpo run folder; choose another"
                             + (" (--overwrite clears minidpo run folders only)" if overwrite else ""))
    if not overwrite:
        state, kind = marker.get("state", "earlier"), marker.get("command", "minidpo")
        article = "an" if state[0] in "aeiou" else "a"
        hint = ("continue it with `minidpo train --resume DIR`, " if kind == command == "train"
                and state != "finished" else "")
        raise RunFolderError(f"--output-dir {out} holds {article} {state} `{kind}` run; {hint}pass --overwrite to "
                             "replace it, or choose another folder")
    return marker


def clear(out: Path) -> None:
    """Empty a run folder (its lock file stays: this process holds it)."""
    for p in out.iterdir():
        if p.name == LOCK_FILE:
            continue
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def has_progress(out: Path) -> bool:
    """Whether a run in ``out`` got anywhere: a metrics row, a checkpoint or a saved model."""
    metrics = out / "metrics.jsonl"
    return ((metrics.is_file() and metrics.stat().st_size > 0) or any(
        (out / name).exists() for name in (CHECKPOINT, CHECKPOINT + ".old", CHECKPOINT + ".tmp", "config.json")))


@contextlib.contextmanager
def run_folder(out: str | os.PathLike, command: str, *, resume: bool = False, overwrite: bool = False,
               inputs: dict[str, str | None] | None = None, info: dict | None = None):
    """Check, create, lock and mark ``out`` for one command; clear it first with ``overwrite``.

    On the way out the marker's state becomes finished / interrupted / failed; a folder this command created
    is removed again when the command failed before any progress (so a typo leaves nothing behind).
    """
    out = Path(out)
    check_output_dir(out, command, resume=resume, overwrite=overwrite, inputs=inputs)
    created = not out.exists()
    try:
        with locked(out):
            if overwrite and not resume:
                clear(out)
            if resume:
                update_marker(out, **(info or {}))
            else:
                write_atomic(out / RUN_MARKER, "{}")
                update_marker(out, command=command, state="starting", **(info or {}))
            try:
                yield out
            except BaseException as error:
                if created and not has_progress(out):
                    shutil.rmtree(out, ignore_errors=True)
                elif (read_marker(out) or {}).get("state") in ("starting", "running"):
                    update_marker(out, state="interrupted" if isinstance(error, KeyboardInterrupt) else "failed")
                raise
            if (read_marker(out) or {}).get("state") != "finished":
                update_marker(out, state="finished")
    except OSError as error:
        raise _os_error(error, out) from None


def _os_error(error: OSError, where: Path) -> RunFolderError:
    what = error.strerror or type(error).__name__
    return RunFolderError(f"cannot write to {error.filename or where}: {what}")


# ------------------------------------------------------------------------------------------- checkpoints

def _write_manifest(folder: Path, step: int) -> None:
    files = {p.name: {"size": p.stat().st_size, "blake2b": _file_digest(p)}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    write_atomic(folder / MANIFEST, json.dumps({"step": step, "files": files}, indent=1))


def verify_checkpoint(folder: Path) -> int:
    """The step a checkpoint holds; ``DamagedFile`` naming the first file that is missing or not as written."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        step, files = int(manifest["step"]), manifest["files"]
    except FileNotFoundError:
        raise DamagedFile(f"{folder} is incomplete (no {MANIFEST}: the save did not finish)") from None
    except (ValueError, KeyError, TypeError):
        raise DamagedFile(f"{folder / MANIFEST} is damaged") from None
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            raise DamagedFile(f"{path} is missing")
        size = path.stat().st_size
        if size != expected["size"]:
            raise DamagedFile(f"{path} has {size} bytes, {expected['size']} were written (truncated?)")
        if _file_digest(path) != expected["blake2b"]:
            raise DamagedFile(f"{path} does not match its checksum (altered?)")
    return step


def save_checkpoint(out: Path, step: int, write) -> Path:
    """``write(folder)`` fills a fresh ``checkpoint.tmp``; its manifest goes last; then two renames swap it in.

    At every instant one complete checkpoint exists: the old ``checkpoint`` (until the first rename), then
    ``checkpoint.old`` and the complete ``checkpoint.tmp`` (between the renames), then the new ``checkpoint``.
    """
    ckpt, tmp, old = out / CHECKPOINT, out / (CHECKPOINT + ".tmp"), out / (CHECKPOINT + ".old")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write(tmp)
    _write_manifest(tmp, step)
    if ckpt.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(ckpt, old)
    os.replace(tmp, ckpt)
    if old.exists():
        shutil.rmtree(old)
    return ckpt


def find_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint in ``out`` (after a kill mid-swap it may be ``.tmp`` or ``.old``), moved
    back to ``checkpoint``; None when there is none; ``DamagedFile`` when the only one there is damaged."""
    ckpt = out / CHECKPOINT
    found, problems = [], []
    for folder in (ckpt, out / (CHECKPOINT + ".tmp"), out / (CHECKPOINT + ".old")):
        if folder.is_dir():
            try:
                found.append((verify_checkpoint(folder), folder))
            except DamagedFile as error:
                problems.append(error)
    if not found:
        if problems:
            raise DamagedFile(f"{problems[0]}; the run cannot resume: start afresh with --overwrite")
        return None
    best = max(found, key=lambda sf: sf[0])[1]
    if best != ckpt:  # a kill between the renames: make the survivor the checkpoint again
        if ckpt.exists():
            shutil.rmtree(ckpt)
        os.replace(best, ckpt)
    for leftover in (out / (CHECKPOINT + ".tmp"), out / (CHECKPOINT + ".old")):
        if leftover.exists():
            shutil.rmtree(leftover)
    return ckpt


def checkpoint_step(out: Path) -> int | None:
    """The step of the checkpoint in ``out`` without moving anything (None when there is no good one)."""
    try:
        return verify_checkpoint(out / CHECKPOINT)
    except DamagedFile:
        return None


def cut_metrics(path: Path, step: int) -> None:
    """Keep the rows of ``metrics.jsonl`` up to ``step`` (a resume redoes the steps after its checkpoint),
    dropping a line torn by a kill."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and row.get("step", step + 1) <= step:
            kept.append(line + "\n")
    write_atomic(path, "".join(kept))


def read_metrics(path: Path) -> list[dict]:
    rows = []
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                rows.append(json.loads(line))
    return [r for r in rows if isinstance(r, dict)]

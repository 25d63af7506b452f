"""The folder a training run writes into (--output): one run at a time, never another run's results.

    folder = new_run_folder(Path("runs"), "resmlp_tiny-20250101-120000")   # a fresh, unique name
    with RunFolder.claim(folder, continuing=False):       # refuses a folder in use or holding results
        write_atomically(folder / "config.json", lambda file: file.write(text))
        append_log(folder / "log.jsonl", record)

- Results are never overwritten by another run: claiming a folder that holds log.jsonl, checkpoint.npz or
  best.npz is refused unless the run continues them (it resumes a checkpoint of that folder).
- A live run holds an exclusive lock (fcntl.flock on run.lock, with its pid inside) until it ends; the
  operating system releases it however the process ends, kill -9 included. A second run into the same
  folder is refused while the first one lives. run.lock itself stays (deleting a lock file races with
  the next run taking it); it is not a result.
- Temporary files have unique names beside their target (.<name>.<pid>.<random>.tmp) and are removed on
  any error or interrupt; those a killed run left behind are removed when the folder is next claimed.
- The log and the checkpoints: each epoch appends its line to log.jsonl first (flushed to disk), then
  writes checkpoint.npz, then best.npz. A kill in between leaves the log ahead of checkpoint.npz, never
  behind it; a resume first drops the lines beyond the checkpoint's epoch (trim_log), then redoes that
  epoch and writes its line again: no line is lost, none is written twice. (A kill between
  checkpoint.npz and best.npz: the resume writes best.npz first, minimlp.training.trainer.)
"""
import contextlib
import errno
import fcntl
import json
import os
import secrets
from pathlib import Path

RESULTS = ("log.jsonl", "checkpoint.npz", "best.npz")
WRITTEN = RESULTS + ("config.json",)  # whose temporaries a claim cleans up
LOCK_NAME = "run.lock"


class RunFolderError(Exception):
    """A run may not write into this folder; the message names it and says what to do."""


def new_run_folder(parent, name):
    """Create and return parent/name, or parent/name-2, -3, ... if taken (two runs started in the same second)."""
    for attempt in range(1, 1000):
        folder = Path(parent) / (name if attempt == 1 else f"{name}-{attempt}")
        try:
            folder.mkdir(parents=True)
            return folder
        except FileExistsError:
            continue
    raise RunFolderError(f"{Path(parent) / name} and 998 variants of it exist already: give --output")


class RunFolder:
    """A folder claimed by this process; release() (or leaving the `with` block) gives it up."""

    def __init__(self, path, lock_file):
        self.path, self.lock_file = path, lock_file

    @classmethod
    def claim(cls, path, continuing):
        """Lock `path` (created if needed) for this run. continuing: the run resumes a checkpoint of this
        folder, so its results are this run's own."""
        path = Path(path)
        refuse_results(path, continuing)  # before writing anything there
        path.mkdir(parents=True, exist_ok=True)
        lock_file = open(path / LOCK_NAME, "a+")
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES):
                lock_file.close()
                raise
            lock_file.seek(0)
            holder = lock_file.read().strip() or "unknown"
            lock_file.close()
            raise RunFolderError(f"{path} is in use by another run (pid {holder}): wait for it to end, or give "
                                 "another --output") from None
        try:
            refuse_results(path, continuing)  # again, now that no other run can write there
        except RunFolderError:
            lock_file.close()
            raise
        lock_file.seek(0)
        lock_file.truncate()
        lock_file.write(f"{os.getpid()}\n")
        lock_file.flush()
        remove_leftovers(path)
        return cls(path, lock_file)

    def release(self):
        self.lock_file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.release()


def refuse_results(path, continuing):
    found = [name for name in RESULTS if (Path(path) / name).exists()]
    if found and not continuing:
        checkpoint = Path(path) / "checkpoint.npz"
        what_to_do = (f"continue that run with --resume {checkpoint}" if checkpoint.exists() else
                      "that run stopped before its first checkpoint, so it cannot be continued: remove the folder "
                      "to start again there")
        raise RunFolderError(f"{path} already holds another run's results ({', '.join(found)}): {what_to_do}, or "
                             "give another --output")


def remove_leftovers(path):
    """Delete the temporary files a killed run left in `path` (this run holds the lock: none is in use)."""
    for entry in Path(path).iterdir():
        if entry.name.endswith(".tmp") and entry.name.lstrip(".").startswith(WRITTEN):
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()


def write_atomically(path, write):
    """write(binary file) into a temporary file beside `path`, flush it to disk, rename it over `path`.
    A crash or interrupt at any moment leaves the old file or the new one, never a mix; on any error
    the temporary file is removed, and an OSError (disk full, too large, no permission) names `path`."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(temporary, "xb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        if isinstance(error, OSError):
            raise OSError(error.errno, f"could not write {path}: {error.strerror or error}") from None
        raise
    sync_folder(path.parent)


def sync_folder(folder):
    """Make a rename in `folder` durable (where the platform allows opening a folder)."""
    with contextlib.suppress(OSError):
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def append_log(path, record):
    """One JSON line at the end of log.jsonl, on disk before returning."""
    try:
        with open(path, "a") as log:
            log.write(json.dumps(record) + "\n")
            log.flush()
            os.fsync(log.fileno())
    except OSError as error:
        raise OSError(error.errno, f"could not write {path}: {error.strerror or error}") from None


def trim_log(path, epochs):
    """Keep the lines of log.jsonl up to epoch `epochs` (those a resumed checkpoint has completed), drop
    the later ones and a torn last line; returns how many lines were dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("epoch", 0) <= epochs:
            kept.append(line)
    if len(kept) != len(lines):
        write_atomically(path, lambda file: file.write("".join(line + "\n" for line in kept).encode()))
    return len(lines) - len(kept)

"""Data parallel: one training run across K processes ("ranks"), GPUs and machines, over MPI (and NCCL).

    mpiexec -n 4 python train.py --device gpu --data imagenet/    # 4 ranks, each on its own GPU
    world = connect()      # MPIWorld when launched by mpiexec, else SingleProcess; mpi4py is imported only then

Semantics, as DeiT/timm: --batch-size is per rank, the global batch is K x batch (the learning-rate
rule uses it). Rank r takes the positions r, r + K, r + 2K, ... of the one-process order of an epoch
(minimlp.data.sampler), augments each with the generator of its global position, and keeps its slice of
the drop-path masks drawn for the whole global batch (ResMLP.drop_path_shard): K ranks see exactly
the images, augmentations and masks that one process sees with --batch-size K x batch. Gradients are
averaged over the ranks before clipping and the optimizer (minimlp.parallel.allreduce), so every rank takes the
same step and holds the same weights; evaluation is sharded the same way and its sums added up.

Both worlds have the same methods, so the loop has no "single process?" branches; the training step
(minimlp.step) is given the world as `sync` under data parallel only (in one process its backward is
model.backward), and uses MPIWorld's
    backward(model, dlogits)   model.backward, then the mean gradient over the ranks
    all_true(flag)             one decision for every rank (a finite gradient, under float16)
Both have
    max(value)                 one decision for every rank (stop now)
    sum(values)                elementwise sum over the ranks (evaluation counts, training losses)
    collect(items)             every rank's items as one list (the loaders' unreadable files)
    barrier(), from_writer(f)  wait for every rank; f() on rank 0, its result on every rank
    check_same(settings)       refuse to start when ranks run other flags or other code
Rank 0 is the writer (logs, checkpoints, progress); the other ranks print nothing but warnings and
their error (see quiet_other_ranks).

Faults. A rank that fails with an error prints one line, "rank r/K: error: ...", and aborts the job
(MPI_Abort: mpiexec stops every rank); an uncaught exception does the same after its traceback. A rank
killed outright (kill -9, out of memory) is reported by mpiexec, which kills the others at once
(MPICH's Hydra names its pid: the start-up line maps pids to ranks). Every wait for the other ranks in
the training loop has a watchdog (MINIMLP_COLLECTIVE_TIMEOUT, 300 s): a rank stuck or gone without
mpiexec noticing aborts the job with one line instead of hanging.
"""
import collections
import hashlib
import json
import os
import socket
import sys
import traceback
from pathlib import Path

import numpy as np

from .allreduce import BucketedMean, MPIAllreduce, NCCLAllreduce, wait
from .launcher import launched_by_mpi, unlink_shared_memory

COLLECTIVE_TIMEOUT = float(os.environ.get("MINIMLP_COLLECTIVE_TIMEOUT", 300))


def connect(environ=None):
    """The world this process belongs to: MPIWorld under mpiexec, else SingleProcess. MPIUnavailable when
    mpiexec started it but mpi4py cannot be imported (MPI is optional: requirements-mpi.txt)."""
    return MPIWorld() if launched_by_mpi(environ) else SingleProcess()


class MPIUnavailable(Exception):
    """Started by mpiexec, without an importable mpi4py; the message says what to install."""


class SingleProcess:
    """One process, no MPI: every method is the one-rank answer."""

    rank, size, local_rank = 0, 1, 0
    is_writer = True

    def together(self, action):
        return action()

    def max(self, value):
        return value

    def sum(self, values):
        return np.asarray(values)

    def collect(self, items):
        return list(items)

    def barrier(self):
        pass

    def from_writer(self, make):
        return make()

    def check_same(self, settings):
        pass

    def use_local_gpu(self, device):
        pass

    def quiet_other_ranks(self):
        pass

    def describe(self, device):
        return None

    def exit(self, code):
        return code


class MPIWorld:
    """This rank of an mpiexec job. rank/size in MPI.COMM_WORLD; local_rank: its index among the ranks of its
    machine (the GPU it takes). bucket_bytes: the gradient buckets' size (minimlp.parallel.allreduce)."""

    is_writer = property(lambda self: self.rank == 0)

    def __init__(self, bucket_bytes=None, timeout=COLLECTIVE_TIMEOUT):
        try:
            from mpi4py import MPI
        except ImportError as error:
            raise MPIUnavailable(f"mpiexec started this process, but mpi4py cannot be imported ({error}): "
                                 "pip install -r requirements-mpi.txt, or run without mpiexec (one process)") from None
        self.MPI, self.comm = MPI, MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        machine = self.comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.local_rank = machine.Get_rank()
        unlink_shared_memory(machine)
        self.bucket_bytes, self.timeout = bucket_bytes, timeout
        self.name = f"rank {self.rank}/{self.size}"
        self.averaging = {}  # id(parameters) -> BucketedMean
        self.all_refuse = False  # every rank failed the same check at once (together, check_same): no abort
        self.error_stream = sys.stderr
        sys.excepthook = self._abort_after_traceback

    # -- the training step -----------------------------------------------------------------
    def backward(self, model, dlogits):
        key = id(model.parameters)
        if key not in self.averaging:
            self.averaging[key] = BucketedMean(model.parameters, self._transport(model.device),
                                               **({} if self.bucket_bytes is None else
                                                  dict(bucket_bytes=self.bucket_bytes)))
        # Each rank's dlogits is its own batch's mean gradient; the global batch's mean weighs each rank by its
        # share of the images. The shares differ only when a loader skipped an unreadable image, but only an
        # all-reduce of one number (each step, before backward) can tell.
        images = dlogits.shape[0]
        total = float(self.sum([images])[0])
        if total != images * self.size:
            dlogits = dlogits * (images * self.size / total)
        self.averaging[key].backward(model, dlogits)

    def _transport(self, device):
        if device == "cpu":
            return MPIAllreduce(self.comm, self.timeout, self.abort)
        from cupy.cuda import nccl
        unique_id = self.comm.bcast(nccl.get_unique_id() if self.rank == 0 else None)
        return NCCLAllreduce(self.size, self.rank, unique_id, self.timeout, self.abort)

    # -- agreement ---------------------------------------------------------------------------
    def _allreduce(self, values, op, what):
        values = np.ascontiguousarray(values)
        result = np.empty_like(values)
        request = self.comm.Iallreduce(values, result, op=op)
        wait(request.Test, what, self.timeout, self.abort)
        return result

    def all_true(self, flag):
        return bool(self._allreduce(np.array([int(bool(flag))]), self.MPI.MIN, "agreeing on a finite gradient")[0])

    def max(self, value):
        """The largest of the ranks' integers (a stop signal's number, 0 for none; a bool)."""
        return int(self._allreduce(np.array([int(value)]), self.MPI.MAX, "agreeing on stopping")[0])

    def sum(self, values):
        return self._allreduce(np.asarray(values, dtype=np.float64), self.MPI.SUM, "adding up over the ranks")

    def collect(self, items):
        """Every rank's items (picklable), in rank order, as one list on every rank. Their number is agreed
        first (an all-reduce of one number, with the watchdog): the usual case, nothing to send, ends there."""
        items = list(items)
        if not self.sum([len(items)])[0]:
            return []
        return [item for theirs in self.comm.allgather(items) for item in theirs]

    def barrier(self):
        wait(self.comm.Ibarrier().Test, "a barrier", self.timeout, self.abort)

    def from_writer(self, make):
        """make() on rank 0 (e.g. reading a checkpoint), its result broadcast to every rank: no shared
        filesystem needed. An error on rank 0 aborts the job (main's exit), which stops the others' wait."""
        return self.comm.bcast(make() if self.rank == 0 else None)

    def together(self, action):
        """action() on every rank, for the checks that every rank makes at start (flags, the dataset): when it
        fails on every rank, they all end in order, each with its error (rank 0's printed), instead of
        racing to abort the job; when it fails on some only, those abort it (exit), as any lone failure."""
        try:
            result, failure = action(), None
        except Exception as error:  # re-raised below, once every rank has said how it went
            result, failure = None, error
        everyone_failed = all(self.comm.allgather(failure is not None))
        if failure is not None:
            self.all_refuse = everyone_failed
            raise failure
        return result

    def check_same(self, settings):
        """Refuse to start (ValueError, on every rank) when a rank was given other settings or runs other code
        than rank 0. settings: the run's completed flags, JSON-ready."""
        mine = dict(settings=json.dumps(settings, sort_keys=True, default=str), code=source_hashes())
        everyone = self.comm.allgather(mine)
        first = everyone[0]
        # every rank sees every rank's settings, so all raise together: none waits for another, and
        # exit() lets them end in order (rank 0's line printed) instead of aborting the job
        self.all_refuse = any(theirs != first for theirs in everyone)
        for rank, theirs in enumerate(everyone[1:], start=1):
            if theirs["code"] != first["code"]:
                files = sorted(name for name in set(first["code"]) | set(theirs["code"])
                               if first["code"].get(name) != theirs["code"].get(name))
                raise ValueError(f"rank {rank} runs other code than rank 0 ({', '.join(files[:3])} differ): "
                                 "every machine needs the same minimlp (the same git revision, no local edits)")
            if theirs["settings"] != first["settings"]:
                ours, other = json.loads(first["settings"]), json.loads(theirs["settings"])
                changed = [f"--{key.replace('_', '-')} {other.get(key)} (rank 0: {ours.get(key)})"
                           for key in sorted(set(ours) | set(other)) if ours.get(key) != other.get(key)]
                raise ValueError(f"rank {rank} was started with other settings than rank 0: {', '.join(changed[:4])}; "
                                 "start every rank with the same command")

    # -- devices, output, exit -----------------------------------------------------------------
    def use_local_gpu(self, device):
        """Make GPU local_rank the current CUDA device (before any CuPy work), unless the run is on the CPU."""
        if device == "cpu":
            return
        from .. import backend
        if not backend.gpu_available():
            return  # resolve_device says what is wrong (gpu) or chooses the CPU (auto)
        import cupy
        count = cupy.cuda.runtime.getDeviceCount()
        if self.local_rank >= count:
            raise backend.DeviceError(f"{self.name} is rank {self.local_rank} on {socket.gethostname()}, which has "
                                      f"{count} GPUs: start at most {count} ranks per machine")
        cupy.cuda.Device(self.local_rank).use()
        if self.size > 1:
            backend.check_gpu_libraries(nccl=True)  # NCCL loads, or one line naming the pip command

    def quiet_other_ranks(self):
        """Ranks other than 0 print nothing (their output would repeat rank 0's) but warnings, prefixed with
        the rank; the last lines are kept and the last one is shown if the rank fails (exit)."""
        if self.rank != 0:
            sys.stdout = sys.stderr = OtherRankOutput(self.error_stream, self.name)

    def describe(self, device):
        """One line for rank 0: every rank's host, pid and device (mpiexec names a killed rank by its pid)."""
        mine = f"{socket.gethostname()} pid {os.getpid()} {device}{self.local_rank if device == 'gpu' else ''}"
        everyone = self.comm.gather(mine)
        if self.rank == 0:
            return (f"data parallel: {self.size} ranks over {self.MPI.Get_library_version().splitlines()[0].strip()}; "
                    + ", ".join(f"rank {rank}: {where}" for rank, where in enumerate(everyone)))
        return None

    def exit(self, code):
        """The process's exit code. A failing rank (a code other than 0 or 128 + a signal, which every rank
        reaches together after a Ctrl-C or SIGTERM) aborts the job: the others may be waiting for it."""
        # 128 + a signal: every rank stopped after the same step
        if code < 128 and code != 0 and not self.all_refuse:
            last = getattr(sys.stderr, "last_line", None)  # the error line of a quiet rank (rank 0's is printed)
            self.abort(f"failed (exit code {code})" + (f": {last}" if last else ""), code)
        return code

    def abort(self, message, code=3):
        print(f"{self.name}: {message}; stopping every rank", file=self.error_stream, flush=True)
        self.comm.Abort(code)

    def _abort_after_traceback(self, kind, value, trace):
        self.error_stream.write("".join(traceback.format_exception(kind, value, trace)))
        self.abort(f"uncaught {kind.__name__}", code=1)


class OtherRankOutput:
    """stdout and stderr of a rank other than 0: warnings go on, prefixed "rank r/K: "; the rest is dropped,
    except the last lines (last_line: the most recent, e.g. the error before an exit)."""

    def __init__(self, stream, name):
        self.stream, self.name = stream, name
        self.pending = ""
        self.tail = collections.deque(maxlen=20)

    @property
    def last_line(self):
        return self.tail[-1] if self.tail else None

    def write(self, text):
        self.pending += text
        *lines, self.pending = self.pending.replace("\r", "\n").split("\n")
        for line in filter(str.strip, lines):
            self.tail.append(line)
            if line.startswith("warning"):
                self.stream.write(f"{self.name}: {line}\n")
        return len(text)

    def flush(self):
        self.stream.flush()

    def isatty(self):
        return False


def source_hashes():
    """{file: sha256} of minimlp's Python files (every sub-package's) and train.py: what check_same compares
    across ranks."""
    package = Path(__file__).resolve().parents[1]
    files = sorted(package.rglob("*.py")) + [path for path in [package.parent / "train.py"] if path.is_file()]
    return {str(path.relative_to(package.parent)): hashlib.sha256(path.read_bytes()).hexdigest()[:16]
            for path in files}

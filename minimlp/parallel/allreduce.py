"""Averaging the flat gradient buffer over K ranks, in buckets, each started while backward still runs.

    averaging = BucketedMean(model.parameters, MPIAllreduce(comm))     # CPU; NCCLAllreduce(...) on GPUs
    averaging.backward(model, dlogits)      # model.backward, then every rank holds the mean gradient

Why buckets. One all-reduce of the whole buffer could only start when backward is done, and the
network would idle during backward and the GPU during the all-reduce. Backward produces the gradients
from the end of the flat buffer to its start (the buffer is in checkpoint order: patch_embed,
blocks.0 .. blocks.N-1, norm, head; backward runs head, norm, blocks N-1 .. 0, patch_embed), and the
model reports each point after which everything to the end of the buffer is final
(`model.backward(dlogits, grads_ready=callback)`, callback(offset): grad[offset:] is final). The
buffer is cut, at parameter boundaries, into buckets of about `bucket_bytes` (25 MB, PyTorch DDP's
bucket_cap_mb), listed from the end of the buffer; a bucket's all-reduce starts at the first report at
or below its start, so it runs while backward computes the earlier layers. Only the last bucket (the
first blocks and patch_embed) waits for the end of backward.

The mean: each rank's gradient is the mean over its b images; the K-rank sum divided by K is the mean
over the K*b images of the global batch, what one process with --batch-size K*b computes.

Two transports with the same three methods (start a bucket, make progress, finish):
  MPIAllreduce   CPU: MPI's non-blocking Iallreduce in place on each bucket. Without a progress thread
                 MPI moves data only inside MPI calls, so progress() tests the open requests at each
                 report of backward.
  NCCLAllreduce  GPU: NCCL (cupy.cuda.nccl) on a stream of its own. A bucket's all-reduce waits on the
                 GPU (an event) for the compute stream to have written it; the compute stream waits for
                 the last all-reduce before the optimizer reads the gradients. The host never blocks.
`wait(done, what)` is the watchdog both use: it aborts the job with one line after `timeout` seconds
without an answer (a rank stuck or gone) instead of hanging.
"""
import time

import numpy as np

BUCKET_BYTES = 25 * 2 ** 20


def bucket_ranges(parameters, bucket_bytes=BUCKET_BYTES):
    """[(start, stop)] covering parameters.grad exactly once, cut at parameter boundaries into pieces of at
    least bucket_bytes (the last piece may be smaller), listed from the end of the buffer (backward's order)."""
    starts = sorted(s.start for s in parameters.slices.values())
    itemsize = parameters.dtype.itemsize
    ranges, stop = [], parameters.size
    for start in reversed(starts):
        if (stop - start) * itemsize >= bucket_bytes or start == 0:
            ranges.append((start, stop))
            stop = start
    return ranges


class BucketedMean:
    """The mean over the ranks of parameters.grad, bucket by bucket, overlapped with backward."""

    def __init__(self, parameters, transport, bucket_bytes=BUCKET_BYTES):
        self.parameters, self.transport = parameters, transport
        self.buckets = bucket_ranges(parameters, bucket_bytes)
        self.started = 0  # buckets of this step whose all-reduce has started

    def backward(self, model, dlogits):
        """model.backward(dlogits) (which OVERWRITES the gradients), then the mean over the ranks in their place."""
        self.started = 0
        model.backward(dlogits, grads_ready=self.grads_ready)
        self.grads_ready(0)  # the whole buffer is final now (backward reports 0 itself; this makes sure)
        self.transport.finish()  # every bucket reduced: grad holds the sum over the ranks
        self.parameters.grad *= 1.0 / self.transport.size

    def grads_ready(self, offset):
        """Called by backward: grad[offset:] is final. Starts every bucket that lies inside it."""
        while self.started < len(self.buckets) and self.buckets[self.started][0] >= offset:
            start, stop = self.buckets[self.started]
            self.transport.start(self.parameters.grad[start:stop])
            self.started += 1
        self.transport.progress()


def wait(done, what, timeout, on_timeout):
    """Poll done() until it is True; after `timeout` seconds call on_timeout(message) (which aborts)."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            on_timeout(f"no answer from the other ranks for {timeout:.0f} s in {what}: a rank is stuck or gone")
        time.sleep(1e-4)


class MPIAllreduce:
    """Sums buckets over an mpi4py communicator with Iallreduce, in place."""

    def __init__(self, comm, timeout, on_timeout):
        from mpi4py import MPI
        self.MPI, self.comm = MPI, comm
        self.size = comm.Get_size()
        self.timeout, self.on_timeout = timeout, on_timeout
        self.requests = []

    def start(self, bucket):
        self.requests.append(self.comm.Iallreduce(self.MPI.IN_PLACE, bucket, op=self.MPI.SUM))

    def progress(self):
        self.MPI.Request.Testall(self.requests)

    def finish(self):
        wait(lambda: self.MPI.Request.Testall(self.requests), "the gradient all-reduce", self.timeout,
             self.on_timeout)
        self.requests = []


class NCCLAllreduce:
    """Sums buckets over NCCL on its own CUDA stream. unique_id: nccl.get_unique_id() of rank 0, the same on
    every rank (broadcast over MPI); the current CUDA device is this rank's GPU."""

    def __init__(self, size, rank, unique_id, timeout, on_timeout):
        import cupy
        from cupy.cuda import nccl
        self.cupy, self.nccl = cupy, nccl
        self.size = size
        self.communicator = nccl.NcclCommunicator(size, unique_id, rank)
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self.types = {np.dtype(np.float16): nccl.NCCL_FLOAT16, np.dtype(np.float32): nccl.NCCL_FLOAT32,
                      np.dtype(np.float64): nccl.NCCL_FLOAT64}
        self.timeout, self.on_timeout = timeout, on_timeout
        self.previous_step = None  # event after the previous step's last all-reduce, for the watchdog

    def start(self, bucket):
        produced = self.cupy.cuda.Event(disable_timing=True)
        produced.record()  # on the compute stream, after the kernels that wrote this bucket
        self.stream.wait_event(produced)
        self.communicator.allReduce(bucket.data.ptr, bucket.data.ptr, bucket.size, self.types[bucket.dtype],
                                    self.nccl.NCCL_SUM, self.stream.ptr)

    def progress(self):
        pass  # NCCL runs on the GPU by itself

    def finish(self):
        reduced = self.cupy.cuda.Event(disable_timing=True)
        reduced.record(self.stream)
        self.cupy.cuda.get_current_stream().wait_event(reduced)  # the optimizer reads the sums after this
        if self.previous_step is not None:  # the watchdog: the GPU may lag the host by one step, not more
            wait(lambda: self.previous_step.done, "the NCCL gradient all-reduce", self.timeout, self.on_timeout)
        self.previous_step = reduced

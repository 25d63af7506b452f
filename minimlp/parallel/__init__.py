"""Data parallel training over MPI (and NCCL on GPUs): distributed, the ranks of a run, what they agree on
(flags, stops, errors) and the one all-reduce of the gradients per step; allreduce, averaging the flat
gradient buffer in buckets while backward still runs; launcher, what mpiexec tells a process before any MPI
call, and the cleanup of MPICH's shared memory. One process never imports MPI.
"""

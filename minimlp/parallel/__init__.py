"""Data parallel training over MPI (and NCCL on GPUs): distributed, the ranks of a run, what they agree on
(flags, stops, errors) and the one all-reduce of the gradients per step; allreduce, averaging the flat
gradient buffer in buckets while backward still runs. One process never imports MPI.
"""

"""The fast paths, beside the reference: modules that offer some of minimlp.layers' (and optim's adamw_update)
functions with the same names, signatures and results, in fewer passes over memory. cuda_kernels: fused CUDA
kernels for CuPy arrays; cpu_kernels: fused multi-threaded loops compiled by Numba, float32 on the CPU (and
the bfloat16 rounding); cpu_settings: the process settings those loops need (threads, the allocator);
bf16_gemm: bfloat16 matrix products on the CPU through oneDNN. minimlp.ops picks one, once, when a model
is built; the reference never branches to them, and tests/test_fast_paths.py runs both on the same inputs.
"""

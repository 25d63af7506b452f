"""Data parallel scaling: training steps of one process against K ranks under mpiexec, on this machine.

    python benchmarks/scaling.py                                  # 1 and 2 ranks, resmlp_tiny, CPU
    python benchmarks/scaling.py --ranks 1 2 4 8 --device gpu --model resmlp_s12 --img-size 224 --batch-size 128

Weak scaling, as DeiT/timm train: --batch-size images per rank, K x batch per step. On the CPU every
K shares the same cores (each rank gets cores / K threads), so the speedup says what splitting the
machine into ranks costs or gains; on GPUs each rank has its own. Each K runs in fresh processes
(mpiexec -n K; K = 1 is the plain process, no MPI). Reported per K: ms per step (the median of
--steps after --warmup), images/s over all ranks, speedup and efficiency against K = 1, and the time
of one all-reduce of the whole gradient buffer alone (no backward to hide behind), the cost the
buckets overlap with backward (minimlp.parallel.allreduce). Synthetic images: the loader is not measured.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
THREAD_VARIABLES = ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--model", default="resmlp_tiny")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32, help="images per rank and step")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one rank, started by mpiexec
    return parser.parse_args()


def worker(args):
    """One rank: time --steps training steps and a bare all-reduce of the gradient buffer; rank 0 prints JSON."""
    from minimlp import backend, create_model
    from minimlp.parallel.distributed import connect
    from minimlp.precision import policy
    from minimlp.optim import AdamW
    from minimlp.step import train_step

    world = connect()
    world.use_local_gpu(args.device)
    model = create_model(args.model, num_classes=1000 if args.model != "resmlp_tiny" else 10, img_size=args.img_size,
                         device=args.device)
    optimizer = AdamW(model.parameters, model.ops, lr=1e-4)
    rng = np.random.default_rng(world.rank)
    images = model.xp.asarray(rng.normal(size=(args.batch_size, 3, args.img_size, args.img_size)), dtype=np.float32)
    labels = rng.integers(0, model.config["num_classes"], args.batch_size)

    def synchronize():
        if args.device == "gpu":
            backend.get_module("gpu").cuda.get_current_stream().synchronize()
        world.barrier()

    times = []
    for step in range(args.warmup + args.steps):
        synchronize()
        started = time.perf_counter()
        train_step(model, optimizer, images, labels, 1e-4, policy("float32"),
                   sync=world if world.size > 1 else None)  # one process: the plain backward
        synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - started)
    allreduce = []
    if world.size > 1:
        transport = world.averaging[id(model.parameters)].transport  # the step's MPI or NCCL transport
        for _ in range(5):
            synchronize()
            started = time.perf_counter()
            transport.start(model.parameters.grad)  # one bucket: the whole buffer
            transport.finish()
            synchronize()
            allreduce.append(time.perf_counter() - started)
    if world.is_writer:
        print(json.dumps(dict(ranks=world.size, ms_per_step=1e3 * float(np.median(times)),
                              allreduce_ms=1e3 * float(np.median(allreduce)) if allreduce else 0.0,
                              gradient_mb=model.parameters.grad.nbytes / 1e6,
                              threads=os.environ.get("NUMBA_NUM_THREADS"))))


def main():
    args = parse_args()
    if args.worker:
        return worker(args)
    from minimlp.parallel.launcher import environment_without_mpi, mpiexec
    cores = os.cpu_count()
    rows = []
    for ranks in args.ranks:
        environment = environment_without_mpi()
        if args.device == "cpu":
            environment.update({name: str(max(1, cores // ranks)) for name in THREAD_VARIABLES})
        command = [sys.executable, __file__, "--worker", *sys.argv[1:]]
        if ranks > 1:
            command = [mpiexec(), "-n", str(ranks), *command]
        result = subprocess.run(command, capture_output=True, text=True, env=environment, cwd=ROOT)
        if result.returncode != 0:
            sys.exit(f"{ranks} ranks failed:\n{result.stdout}\n{result.stderr}")
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    base = rows[0]["ms_per_step"]
    print(f"{args.model} {args.img_size} px, {args.batch_size} images per rank, {args.device}"
          + (f", {cores} cores shared by every K" if args.device == "cpu" else ""))
    print("| ranks | threads/rank | ms/step | images/s | speedup | efficiency | all-reduce alone (MB) |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        images_per_s = row["ranks"] * args.batch_size / (row["ms_per_step"] / 1e3)
        speedup = row["ranks"] * base / row["ms_per_step"]
        print(f"| {row['ranks']} | {row['threads'] or '-'} | {row['ms_per_step']:.1f} | {images_per_s:.0f} | "
              f"{speedup:.2f} | {speedup / row['ranks']:.0%} | {row['allreduce_ms']:.2f} ms "
              f"({row['gradient_mb']:.1f} MB) |")


if __name__ == "__main__":
    main()

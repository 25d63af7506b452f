"""PyTorch's side of benchmarks/train_step.py: timm's ResMLP training steps in a process that never imports minimlp.

    python benchmarks/pytorch_train_step.py WEIGHTS.safetensors --precision bfloat16 --warmup 2 --steps 5 [--compile]

WEIGHTS holds the model's weights under timm's names, the batch (`images`, `labels`) and, in its metadata,
the model (`timm_model`: a timm name such as resmlp_12_224, or `mlp_mixer`: timm's MlpMixer arguments as
JSON), all written by benchmarks/train_step.py from a minimlp model. The step is the usual eager loop with
PyTorch's defaults (its threads, its allocator, whatever environment it is started with): zero_grad,
forward and label-smoothed cross-entropy under `torch.autocast("cpu", dtype=...)` for bfloat16 or float16
(float16 with torch's GradScaler), backward, torch.optim.AdamW with two parameter groups (no weight decay on
1-D parameters, as minimlp). With --compile the model runs under torch.compile (inductor's default mode):
the first step compiles its forward and backward and is timed apart (`first_step`), then --warmup - 1
untimed steps. Prints one JSON line: the median step time and what ran.

timm is imported through minimlp/tools/import_timm.py, loaded by its path, so that no part of the minimlp
package (its thread and allocator settings) is imported; the report says whether any was.
"""
import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

IMPORT_TIMM = Path(__file__).resolve().parent.parent / "minimlp" / "tools" / "import_timm.py"
WEIGHT_DECAY, LR, SMOOTHING = 0.05, 1e-4, 0.1


def load_timm():
    spec = importlib.util.spec_from_file_location("import_timm", IMPORT_TIMM)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("weights", type=Path)
    parser.add_argument("--precision", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="the model under torch.compile (inductor)")
    args = parser.parse_args()
    timm_import = load_timm()
    with safe_open(args.weights, framework="pt") as file:
        tensors = {name: file.get_tensor(name) for name in file.keys()}
        described = file.metadata()
    x, y = tensors.pop("images"), tensors.pop("labels")
    if "timm_model" in described:
        model = timm_import.timm.create_model(described["timm_model"])
    else:
        model = timm_import.mlp_mixer(json.loads(described["mlp_mixer"]))
    model.load_state_dict(tensors)
    decay = [p for p in model.parameters() if p.ndim > 1 and p.shape[:2] != (1, 1)]  # timm's Affine is (1, 1, d)
    no_decay = [p for p in model.parameters() if not (p.ndim > 1 and p.shape[:2] != (1, 1))]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=LR)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=SMOOTHING)
    half = None if args.precision == "float32" else getattr(torch, args.precision)
    scaler = torch.amp.GradScaler("cpu", enabled=half is torch.float16)

    forward = torch.compile(model) if args.compile else model

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=half or torch.bfloat16, enabled=half is not None):
            loss = loss_fn(forward(x), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    compile_started = time.perf_counter()
    step()  # under --compile the first step compiles (forward and backward): timed on its own
    first_step = time.perf_counter() - compile_started
    for _ in range(args.warmup - 1):
        step()
    times = []
    for _ in range(args.steps):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    print(json.dumps(dict(seconds=statistics.median(times), version=torch.__version__, threads=torch.get_num_threads(),
                          first_step=first_step, compiled=args.compile,
                          minimlp_imported=any(name.split(".")[0] == "minimlp" for name in sys.modules))))


if __name__ == "__main__":
    main()

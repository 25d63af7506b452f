"""timm imported on a machine where pip's torchvision cannot load, and timm's MlpMixer from plain arguments.

On a machine with the CPU build of torch, pip's torchvision (which timm imports) is a CUDA build whose compiled
operators cannot load, and importing it then fails while registering fake kernels for `torchvision::nms`/`qnms`.
We declare those two operator schemas first, so the pure-Python parts of torchvision that timm uses (none of them
call the operators) import cleanly. Where torchvision works, nothing is done.

This file imports nothing of minimlp, on purpose: benchmarks/pytorch_train_step.py loads it by its path, so that
PyTorch's side of a benchmark runs in a process that never imports minimlp (minimlp/tools/pytorch_references.py
imports it as part of the package).
"""
import importlib
import sys

import torch


def _import_torchvision():
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as error:
        if "torchvision::nms" not in str(error):
            raise
    for name in [name for name in sys.modules if name.startswith("torchvision")]:
        del sys.modules[name]
    library = torch.library.Library("torchvision", "DEF")
    library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _import_torchvision.library = library  # keep the registration alive
    return importlib.import_module("torchvision")


torchvision = _import_torchvision()
import timm  # noqa: E402
import timm.optim  # noqa: E402
import timm.scheduler  # noqa: E402



def mlp_mixer(arguments):
    """timm's MlpMixer from JSON-ready arguments (pytorch_references.twin_arguments): the block and norm layers
    named as in timm.models.mlp_mixer (ResBlock, Affine: timm's ResMLP)."""
    layers = {key: getattr(timm.models.mlp_mixer, arguments[key]) for key in ("block_layer", "norm_layer")}
    return timm.models.mlp_mixer.MlpMixer(**{**arguments, **layers})


__all__ = ["torch", "torchvision", "timm", "mlp_mixer"]

"""PyTorch and timm, imported for use as references in tests.

On a machine with the CPU build of torch, pip's torchvision (which timm imports) is a CUDA build
whose compiled operators cannot load, and its import then fails registering fake kernels for
`torchvision::nms`/`qnms`. We declare those two operator schemas first so the pure-Python parts
timm uses (none of them call the operators) import cleanly. Where torchvision works, nothing is done.
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


_import_torchvision()
import timm  # noqa: E402
import timm.optim  # noqa: E402

torch.set_num_threads(max(1, torch.get_num_threads()))

__all__ = ["torch", "timm"]

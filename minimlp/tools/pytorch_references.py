"""PyTorch, torchvision and timm as references, and timm's ResMLP holding a minimlp model's weights (its "twin").

For the tests, the lessons that compare with PyTorch and the benchmarks; never imported by the training
path (torch is a test-only dependency, requirements-test.txt): `import minimlp.tools.pytorch_references` needs torch and timm.

Why the import is not plain: on a machine with the CPU build of torch, pip's torchvision (which timm
imports) is a CUDA build whose compiled operators cannot load, and importing it then fails while
registering fake kernels for `torchvision::nms`/`qnms`. We declare those two operator schemas first, so
the pure-Python parts of torchvision that timm uses (none of them call the operators) import cleanly.
Where torchvision works, nothing is done.
"""
import importlib
import sys

import torch

from ..weights import official_to_timm


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

torch.set_num_threads(max(1, torch.get_num_threads()))


def timm_twin(model, dtype=torch.float64):
    """A timm ResMLP (MlpMixer with ResBlock and Affine) with the same configuration and the same weights
    as the minimlp `model`, in `dtype`."""
    c = model.config
    twin = timm.models.mlp_mixer.MlpMixer(
        num_classes=c["num_classes"], img_size=c["img_size"], in_chans=c["in_chans"], patch_size=c["patch_size"],
        num_blocks=c["depth"], embed_dim=c["dim"], mlp_ratio=c["mlp_ratio"], drop_path_rate=c["drop_path"],
        block_layer=timm.models.mlp_mixer.ResBlock, norm_layer=timm.models.mlp_mixer.Affine).to(dtype)
    weights = {name: torch.from_numpy(value) for name, value in official_to_timm(model.state_dict()).items()}
    twin.load_state_dict(weights)  # after .to(dtype): loading into float32 first would round float64 weights
    return twin


__all__ = ["torch", "torchvision", "timm", "timm_twin"]

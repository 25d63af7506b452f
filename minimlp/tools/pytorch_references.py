"""PyTorch, torchvision and timm as references, and timm's ResMLP holding a minimlp model's weights (its "twin").

For the tests, the lessons that compare with PyTorch and the benchmarks; never imported by the training
path (torch is a test-only dependency, requirements-test.txt): `import minimlp.tools.pytorch_references` needs torch and timm.

Why the import is not plain (pip's torchvision on a CPU torch): minimlp/tools/import_timm.py.
"""
import torch

from ..weights import official_to_timm
from .import_timm import mlp_mixer, timm, torchvision

torch.set_num_threads(max(1, torch.get_num_threads()))


def twin_arguments(config):
    """timm's MlpMixer arguments for a minimlp model's configuration, JSON-ready: the block and norm layers by
    their names in timm.models.mlp_mixer (benchmarks/pytorch_train_step.py builds the twin from them too)."""
    c = config
    return dict(num_classes=c["num_classes"], img_size=c["img_size"], in_chans=c["in_chans"],
                patch_size=c["patch_size"], num_blocks=c["depth"], embed_dim=c["dim"], mlp_ratio=c["mlp_ratio"],
                drop_path_rate=c["drop_path"], block_layer="ResBlock", norm_layer="Affine")


def timm_twin(model, dtype=torch.float64):
    """A timm ResMLP (MlpMixer with ResBlock and Affine) with the same configuration and the same weights
    as the minimlp `model`, in `dtype`."""
    twin = mlp_mixer(twin_arguments(model.config)).to(dtype)
    weights = {name: torch.from_numpy(value) for name, value in official_to_timm(model.state_dict()).items()}
    twin.load_state_dict(weights)  # after .to(dtype): loading into float32 first would round float64 weights
    return twin


__all__ = ["torch", "torchvision", "timm", "timm_twin"]

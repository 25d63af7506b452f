"""Checkpoint names: the official (facebookresearch/deit) names are ours; timm's are translated
(docs/reference.md, Checkpoint names).

    official                      timm
    patch_embed.proj.*            stem.proj.*
    blocks.i.attn.*               blocks.i.linear_tokens.*
    blocks.i.mlp.fc1|fc2.*        blocks.i.mlp_channels.fc1|fc2.*
    blocks.i.gamma_1|gamma_2      blocks.i.ls1|ls2
    *.alpha, *.beta  [d]          *.alpha, *.beta  [1, 1, d]
"""
import zipfile
from pathlib import Path

import numpy as np

# official name part -> timm name part (names are compared part by part, split at the dots)
OFFICIAL_TO_TIMM = {"patch_embed": "stem", "attn": "linear_tokens", "mlp": "mlp_channels",
                    "gamma_1": "ls1", "gamma_2": "ls2"}
TIMM_TO_OFFICIAL = {timm: official for official, timm in OFFICIAL_TO_TIMM.items()}


def _rename(name, part_map):
    return ".".join(part_map.get(part, part) for part in name.split("."))


class WeightsError(ValueError):
    """A state dict or weights file that does not fit the model."""


def is_affine(name):
    return name.endswith(".alpha") or name.endswith(".beta")


def timm_to_official(state_dict):
    """timm names and [1, 1, d] Affine shapes -> official names and [d]. Official entries pass through."""
    converted = {}
    for name, value in state_dict.items():
        name = _rename(name, TIMM_TO_OFFICIAL)
        value = np.asarray(value)
        if is_affine(name) and value.ndim == 3 and value.shape[:2] == (1, 1):
            value = value.reshape(-1)
        converted[name] = value
    return converted


def official_to_timm(state_dict):
    """Official names -> timm's names and shapes, e.g. to load our weights into timm's ResMLP."""
    converted = {}
    for name, value in state_dict.items():
        name = _rename(name, OFFICIAL_TO_TIMM)
        value = np.asarray(value)
        converted[name] = value.reshape(1, 1, -1) if is_affine(name) else value
    return converted


def read_weights(path):
    """A {name: numpy array} dict from a .npz (ours or numpy-saved) or .safetensors (timm's hub format).
    A train.py checkpoint stores the model weights under 'model/' keys; those are picked out."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file")
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file
        try:
            return load_file(str(path))
        except Exception as error:  # safetensors raises its own error types for bad files
            raise WeightsError(f"{path}: not a readable .safetensors file ({error})") from None
    if path.suffix == ".npz":
        try:
            open(path, "rb").close()  # a file that cannot be read is not a damaged one: say why
        except OSError as error:
            raise WeightsError(f"{path}: cannot be read ({error.strerror})") from None
        if not zipfile.is_zipfile(path):  # np.load would take it for a pickle, and say so
            raise WeightsError(f"{path}: not a readable .npz file (not a zip archive): it is damaged, or was not "
                               "written by numpy.savez or train.py")
        try:
            with np.load(path, allow_pickle=False) as archive:
                arrays = {name: archive[name] for name in archive.files}
        except Exception as error:
            raise WeightsError(f"{path}: not a readable .npz file ({error})") from None
        if any(name.startswith("model/") for name in arrays):
            return {name[len("model/"):]: value for name, value in arrays.items() if name.startswith("model/")}
        return arrays
    raise WeightsError(f"{path}: unknown weights format {path.suffix!r}; use .npz or .safetensors "
                       "(convert a PyTorch .pth with torch.load and numpy.savez)")

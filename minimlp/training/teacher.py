"""The teacher of --distillation-type soft/hard (DeiT's): logits for the very batch the student trains on,
after erasing and Mixup/CutMix, on the same device. The teacher is never trained: it gets no gradient.

    teacher = load_teacher("regnety_160", "regnety_160-a5fe301d.pth", num_classes=1000, img_size=224, device="gpu")
    teacher_logits = teacher(images)       # images: the normalized batch (B, 3, H, W), numpy or cupy

Two kinds, told apart by --teacher-model:
  a minimlp preset (resmlp_s36, resmlp_b24, ...): run by minimlp itself, with weights from --teacher-path
      (.npz or .safetensors, official or timm names, e.g. timm's published resmlp_36_224, or a train.py
      checkpoint). No PyTorch needed.
  any other name: a timm model (DeiT's teacher is regnety_160, RegNetY-16GF), built by timm.create_model and
      loaded from --teacher-path (a PyTorch state dict, or DeiT's {'model': state dict}), run by PyTorch in
      evaluation mode on the same device. The batch crosses by DLPack, without a copy: a CuPy array becomes
      a torch CUDA tensor on the same memory (and the logits come back the same way), a NumPy array a CPU
      tensor. PyTorch and timm are needed only for this (pip install torch timm).

Why run the teacher at every step rather than store its predictions once: the student never sees the
same image twice (each epoch draws new crops, RandAugment ops, erased boxes and Mixup/CutMix pairs), and
DeiT's teacher sees exactly the student's augmented input; predictions of the plain images would teach
the wrong targets for mixed ones.
"""
import numpy as np

from ..backend import get_xp
from ..model import PRESETS, create_model
from ..weights import WeightsError, read_weights


def load_teacher(name, path, num_classes, img_size, device, fast=True):
    """A callable images -> teacher logits (B, num_classes) on the images' device."""
    if name in PRESETS:
        return MinimlpTeacher(name, path, num_classes, img_size, device, fast)
    return TorchTeacher(name, path, num_classes, device)


class MinimlpTeacher:
    """A minimlp ResMLP with published or trained weights, in evaluation mode (no drop path)."""

    def __init__(self, name, path, num_classes, img_size, device, fast=True):
        self.model = create_model(name, num_classes=num_classes, img_size=img_size, device=device, fast=fast)
        try:
            self.model.load_state_dict(read_weights(path))
        except WeightsError as error:
            raise WeightsError(f"--teacher-path {path} for --teacher-model {name}: {error}") from None
        self.description = f"{name} (minimlp) from {path}"

    def __call__(self, images):
        logits = self.model.forward(images)
        self.model.free_activations()
        return logits


class TorchTeacher:
    """A timm model run by PyTorch on the same device; batches and logits cross by DLPack."""

    def __init__(self, name, path, num_classes, device):
        try:
            from ..tools.pytorch_references import timm, torch  # timm imported as the tests do (tools/pytorch_references.py: CPU torch with pip's torchvision)
        except ImportError as error:
            raise ValueError(f"--teacher-model {name} is a PyTorch model (not a minimlp preset: "
                             f"{', '.join(PRESETS)}), which needs torch and timm ({error}): pip install torch timm"
                             ) from None
        self.torch = torch
        try:
            model = timm.create_model(name, pretrained=False, num_classes=num_classes)
        except RuntimeError as error:
            raise ValueError(f"--teacher-model {name}: neither a minimlp preset ({', '.join(PRESETS)}) nor a timm "
                             f"model ({error})") from None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise WeightsError(f"--teacher-path {path}: not a readable PyTorch checkpoint ({error})") from None
        state = state.get("model", state) if isinstance(state, dict) else state
        try:
            model.load_state_dict(state)
        except (RuntimeError, TypeError) as error:
            first_line = str(error).strip().splitlines()[0]
            raise WeightsError(f"--teacher-path {path} does not fit --teacher-model {name} with {num_classes} "
                               f"classes: {first_line}") from None
        self.device = "cuda" if device == "gpu" else "cpu"
        self.model = model.to(self.device).eval()
        self.description = f"{name} (PyTorch, timm) from {path}"

    def __call__(self, images):
        torch = self.torch
        xp = get_xp(images)
        with torch.no_grad():
            if xp is np:
                batch = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
            else:
                batch = torch.from_dlpack(xp.ascontiguousarray(images, dtype=np.float32))
            logits = self.model(batch).float().contiguous()
        return logits.numpy() if xp is np else xp.from_dlpack(logits)

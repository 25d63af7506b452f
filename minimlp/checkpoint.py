"""Training checkpoints: one .npz holding everything a run needs to continue exactly.

    model/<official name>   the weights (what minimlp.weights.read_weights picks out)
    optimizer/<key>         the optimizer's state (moments, step count)
    meta                    JSON: epoch and batch to continue from, global step, RNG states,
                            class list, model configuration and the run's full configuration

Written atomically: into a temporary file in the same folder, flushed to disk, then renamed over
the old one, so a crash or Ctrl-C mid-write never leaves a half-written checkpoint.
"""
import json
import os
from pathlib import Path

import numpy as np

from .weights import WeightsError


def save_checkpoint(path, weights, optimizer_state, meta):
    """weights, optimizer_state: {name: numpy array}; meta: a JSON-serializable dict."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"model/{name}": value for name, value in weights.items()}
    arrays.update({f"optimizer/{name}": np.asarray(value) for name, value in optimizer_state.items()})
    arrays["meta"] = np.array(json.dumps(meta))
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as file:
        np.savez(file, **arrays)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def is_training_checkpoint(path):
    """True for a .npz written by save_checkpoint (it has 'meta'), False for weights alone."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            return "meta" in archive.files
    except (OSError, ValueError):
        return False


def load_checkpoint(path):
    """-> (weights, optimizer_state, meta). A file without 'meta' is weights only (not resumable)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such checkpoint")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except Exception as error:
        raise WeightsError(f"{path}: not a readable .npz checkpoint ({error})") from None
    if "meta" not in arrays:
        raise WeightsError(f"{path}: holds no training state (no 'meta'): it can be evaluated or used as "
                           "initial weights, not resumed")
    weights = {name[len("model/"):]: value for name, value in arrays.items() if name.startswith("model/")}
    optimizer_state = {name[len("optimizer/"):]: value for name, value in arrays.items()
                       if name.startswith("optimizer/")}
    return weights, optimizer_state, json.loads(str(arrays["meta"]))

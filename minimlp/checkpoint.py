"""Training checkpoints: one .npz holding everything a run needs to continue exactly. This module owns
saving a run, restoring it, and deciding whether a checkpoint may continue with the flags given.

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

from .model import PRESETS
from .weights import WeightsError, read_weights


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


# ---------------------------------------------------------------------------------------------
# A whole run: model, optimizer, loss scaler, generators, where it stands, its classes and settings.
# ---------------------------------------------------------------------------------------------
def save_run(path, model, optimizer, scaler, position, classes, settings):
    meta = dict(position=position, classes=list(classes), model=model.config, settings=settings,
                drop_path_rng=model.drop_path_rng.bit_generator.state, loss_scaler=scaler.state_dict())
    save_checkpoint(path, model.state_dict(), optimizer.state_dict(), meta)


def restore_run(checkpoint, model, optimizer, scaler, weight_decay):
    """Put a checkpoint's state (from read_resume) into a freshly built model, optimizer and loss scaler;
    returns the position to continue from. weight_decay: the run's --weight-decay, which wins over the
    checkpoint's (the flag defaults to it)."""
    weights, optimizer_state, meta = checkpoint
    model.load_state_dict(weights)
    optimizer.load_state_dict(optimizer_state)
    optimizer.weight_decay = weight_decay
    model.drop_path_rng.bit_generator.state = meta["drop_path_rng"]
    if meta.get("loss_scaler"):  # an AMP run goes on with its loss scale
        scaler.load_state_dict(meta["loss_scaler"])
    return meta["position"]


def read_resume(path, eval_only=False):
    """(weights, optimizer state, meta) of a --resume file. With eval_only, weights alone will do
    (published .safetensors/.npz weights): optimizer state and meta are then None."""
    if eval_only:
        weights = read_weights(path)
        meta = load_checkpoint(path)[2] if is_training_checkpoint(path) else None
        return weights, None, meta
    return load_checkpoint(path)


def check_compatible(path, meta, settings, classes, eval_only=False):
    """A checkpoint continues only with the same model and the same classes (and, to train on, the same
    optimizer, batch size and seed). settings: the run's flags as a dict."""
    config = meta["model"]
    now = dict(name=settings["model"], img_size=settings["img_size"], num_classes=len(classes),
               drop_path=settings["drop_path"],
               patch_size=settings["patch_size"] or PRESETS[settings["model"]]["patch_size"])
    flags = dict(name="--model", img_size="--img-size", num_classes="number of classes", drop_path="--drop-path",
                 patch_size="--patch-size")
    if eval_only:
        del now["drop_path"]  # no stochastic depth in evaluation: any rate will do
    mismatched = [f"{flags[key]} {config[key]} (now {value})" for key, value in now.items() if config[key] != value]
    if mismatched:
        raise WeightsError(f"{path} was made with " + ", ".join(mismatched) +
                           ": use the same settings, or start a new run without --resume")
    if meta["classes"] != list(classes):
        missing = sorted(set(meta["classes"]) - set(classes))[:3]
        added = sorted(set(classes) - set(meta["classes"]))[:3]
        raise WeightsError(f"{path} was made for other classes than those of {settings['data'] or 'the demo'}"
                           f" (not there now: {missing}; new: {added})")
    if eval_only:
        return
    # Where a run stands (epoch, batch) only means the same thing with the same batches: same size, same order.
    changed = [f"{flag} {meta['settings'].get(key)} (now {settings[key]})"
               for flag, key in [("--opt", "opt"), ("--batch-size", "batch_size"), ("--seed", "seed")]
               if meta["settings"].get(key) != settings[key]]
    if changed:
        raise WeightsError(f"{path} was trained with " + ", ".join(changed) + ": a resumed run continues "
                           "with the same optimizer, batch size and seed (leave these flags out to keep them)")

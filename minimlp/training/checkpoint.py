"""Training checkpoints: one .npz holding everything a run needs to continue exactly. This module owns
saving a run, restoring it, and deciding whether a checkpoint may continue with the flags given.

    model/<official name>   the weights (what minimlp.weights.read_weights picks out)
    optimizer/<key>         the optimizer's state (moments, step count)
    ema/<key>               with --model-ema: the average of the weights (minimlp.training.ema.ModelEma.state_dict)
    meta                    JSON: epoch and batch to continue from, global step, RNG states,
                            class list, model configuration and the run's full configuration

Written atomically (minimlp.training.run_folder.write_atomically): into a uniquely named temporary file in the
same folder, flushed to disk, then renamed over the old one, so a crash or Ctrl-C mid-write never
leaves a half-written checkpoint, and a failed write (disk full) leaves no temporary file.
"""
import json
import zipfile
from pathlib import Path

import numpy as np

from .ema import ModelEma
from ..model import PRESETS
from .run_folder import write_atomically
from ..weights import WeightsError, read_weights


def save_checkpoint(path, weights, optimizer_state, meta, extra=None):
    """weights, optimizer_state: {name: numpy array}; meta: a JSON-serializable dict; extra: more groups,
    {group: {name: numpy array}}, saved as group/name (load_checkpoint(path, extra=True) gives them back)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"model/{name}": value for name, value in weights.items()}
    arrays.update({f"optimizer/{name}": np.asarray(value) for name, value in optimizer_state.items()})
    for group, entries in (extra or {}).items():
        arrays.update({f"{group}/{name}": np.asarray(value) for name, value in entries.items()})
    arrays["meta"] = np.array(json.dumps(meta))
    write_atomically(path, lambda file: np.savez(file, **arrays))


def is_training_checkpoint(path):
    """True for a .npz written by save_checkpoint (it has 'meta'), False for weights alone."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            return "meta" in archive.files
    except (OSError, ValueError):
        return False


def load_checkpoint(path, extra=False):
    """-> (weights, optimizer_state, meta), and with extra=True a fourth item, the other groups
    {group: {name: array}} (e.g. 'ema'). A file without 'meta' is weights only (not resumable)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such checkpoint")
    if not zipfile.is_zipfile(path):  # np.load would talk about pickles
        if path.suffix == ".safetensors":
            raise WeightsError(f"{path}: published weights, not a training checkpoint: evaluate them with "
                               "--eval-only; --resume continues a run from its checkpoint.npz")
        raise WeightsError(f"{path}: not a readable .npz checkpoint (not a zip archive): give the "
                           "checkpoint.npz of a run")
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
    meta = parse_meta(path, arrays["meta"])
    if not extra:
        return weights, optimizer_state, meta
    groups = {}
    for name, value in arrays.items():
        group, _, key = name.partition("/")
        if key and group not in ("model", "optimizer"):
            groups.setdefault(group, {})[key] = value
    return weights, optimizer_state, meta, groups


# What train.py reads in meta, and needs to find there.
META_KEYS = ("classes", "model", "settings")  # what any reader (--eval-only, predict.py) takes from it
RESUME_KEYS = ("position", "drop_path_rng")  # and what --resume needs on top
# What each of them must be: (type, the fields that readers take from it)
META_ENTRIES = {"classes": (list, ()), "settings": (dict, ()), "drop_path_rng": (dict, ("bit_generator", "state")),
                "model": (dict, ("name", "num_classes", "img_size", "patch_size", "dim", "depth", "layerscale_init",
                           "drop_path")),
                "position": (dict, ("epoch", "batch", "global_step", "loss_sum", "images", "seconds", "best_top1"))}


def parse_meta(path, text, keys=META_KEYS):
    """The JSON of a checkpoint's 'meta' entry, checked to hold `keys`."""
    try:
        meta = json.loads(str(text))
    except ValueError as error:
        raise WeightsError(f"{path}: its 'meta' entry is not JSON ({error}): the file is damaged, or was not "
                           "written by train.py") from None
    missing = [key for key in keys if key not in meta] if isinstance(meta, dict) else list(keys)
    if missing:
        raise WeightsError(f"{path}: its 'meta' entry lacks {', '.join(missing)}: not a checkpoint written by "
                           "train.py (weights alone can be evaluated with --eval-only)")
    check_entries(path, meta, keys)
    return meta


def check_entries(path, meta, keys):
    """Each of meta's `keys` is what META_ENTRIES says, or WeightsError naming the file and the entry."""
    for key in keys:
        kind, fields = META_ENTRIES[key]
        value = meta[key]
        lacking = [field for field in fields if field not in value] if isinstance(value, kind) else None
        if lacking is None or lacking:
            what = f"lacks {', '.join(lacking)}" if lacking else f"is not a {'list' if kind is list else 'dict'}"
            raise WeightsError(f"{path}: the {key!r} of its 'meta' entry {what}: the file is damaged, or was not "
                               "written by train.py")


def read_meta(path):
    """The meta of a training checkpoint, without reading its arrays."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            text = archive["meta"]
    except Exception as error:
        raise WeightsError(f"{path}: not a readable .npz checkpoint ({error})") from None
    return parse_meta(path, text, META_KEYS + RESUME_KEYS)


# ---------------------------------------------------------------------------------------------
# A whole run: model, optimizer, float16's loss scaler, generators, where it stands, its classes and settings.
# ---------------------------------------------------------------------------------------------
def save_run(path, model, optimizer, precision, position, classes, settings, ema=None):
    """precision: the run's minimlp.precision.Precision (its name is in settings: --amp, --amp-dtype; its loss
    scaler's state, float16 only, in loss_scaler); ema: the run's minimlp.training.ema.ModelEma (--model-ema), or
    None."""
    scaler = precision.loss_scaler
    meta = dict(position=position, classes=list(classes), model=model.config, settings=settings,
                drop_path_rng=model.drop_path_rng.bit_generator.state,
                loss_scaler=scaler.state_dict() if scaler else None)
    extra = {"ema": ema.state_dict()} if ema is not None else None
    save_checkpoint(path, model.state_dict(), optimizer.state_dict(), meta, extra)


def load_weights_of(path, model, weights):
    """model.load_state_dict(weights), its complaint naming the file they came from."""
    try:
        model.load_state_dict(weights)
    except WeightsError as error:
        raise WeightsError(f"{path}: {error}") from None


def restore_run(path, checkpoint, model, optimizer, precision, weight_decay, ema=None):
    """Put a checkpoint's state (from read_resume of `path`) into a freshly built model, optimizer, precision (a
    float16 run's loss scaler; one that the checkpoint lacks starts afresh) and EMA (--model-ema; one that the
    checkpoint lacks starts from its weights); returns the position to continue from. weight_decay: the run's
    --weight-decay, which wins over the checkpoint's (the flag defaults to it)."""
    weights, optimizer_state, meta, groups = checkpoint
    load_weights_of(path, model, weights)
    optimizer.load_state_dict(optimizer_state)
    optimizer.weight_decay = weight_decay
    model.drop_path_rng.bit_generator.state = meta["drop_path_rng"]
    if meta.get("loss_scaler") and precision.loss_scaler:  # a float16 run goes on with its loss scale
        precision.loss_scaler.load_state_dict(meta["loss_scaler"])
    if ema is not None:
        decay = ema.decay  # the run's --model-ema-decay wins, as --weight-decay does
        if "ema" in groups:
            ema.load_state_dict(groups["ema"])
        else:
            ema.data[...] = model.parameters.data
        ema.decay = decay
    return meta["position"]


def restore_for_evaluation(path, checkpoint, model, use_ema=False):
    """Put the weights of a --resume file (from read_resume) into the model; with use_ema (--eval-only
    --model-ema), its average of the weights (a train.py checkpoint of a --model-ema run) in their place."""
    weights, _, _, groups = checkpoint
    load_weights_of(path, model, weights)
    if use_ema:
        if "ema" not in groups:
            raise ValueError(f"--model-ema: {path} holds no average of the weights (trained without "
                             "--model-ema?); leave the flag out to evaluate its weights")
        ema = ModelEma(model.parameters.data)
        ema.load_state_dict(groups["ema"])  # (says so when it does not fit the model)
        model.parameters.data[...] = ema.data


def read_resume(path, eval_only=False):
    """(weights, optimizer state, meta, other groups such as 'ema') of a --resume file. With eval_only,
    weights alone will do (published .safetensors/.npz weights): optimizer state and meta are then None."""
    if eval_only:
        weights = read_weights(path)
        if not is_training_checkpoint(path):
            return weights, None, None, {}
        _, _, meta, groups = load_checkpoint(path, extra=True)
        return weights, None, meta, groups
    weights, optimizer_state, meta, groups = load_checkpoint(path, extra=True)
    missing = [key for key in RESUME_KEYS if key not in meta]
    if missing:
        raise WeightsError(f"{path}: its 'meta' entry lacks {', '.join(missing)}: it cannot be resumed (it can be "
                           "evaluated with --eval-only)")
    check_entries(path, meta, RESUME_KEYS)
    return weights, optimizer_state, meta, groups


class ResumeError(ValueError):
    """A readable checkpoint that cannot continue with the flags given (another model, other classes, another
    optimizer, batch size, seed or epoch order), or whose resume would rewind the run beside it."""


def check_compatible(path, meta, settings, classes, eval_only=False):
    """A checkpoint continues only with the same model and the same classes (and, to train on, the same
    optimizer, batch size and seed), else ResumeError. settings: the run's flags as a dict."""
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
        raise ResumeError(f"{path} was made with " + ", ".join(mismatched) +
                           ": use the same settings, or start a new run without --resume")
    if meta["classes"] != list(classes):
        missing = sorted(set(meta["classes"]) - set(classes))[:3]
        added = sorted(set(classes) - set(meta["classes"]))[:3]
        raise ResumeError(f"{path} was made for other classes than those of {settings['data'] or 'the demo'}"
                           f" (not there now: {missing}; new: {added})")
    if eval_only:
        return
    # Where a run stands (epoch, batch) only means the same thing with the same batches: same size, same order.
    changed = [f"{flag} {meta['settings'].get(key)} (now {settings[key]})"
               for flag, key in [("--opt", "opt"), ("--seed", "seed")] if meta["settings"].get(key) != settings[key]]
    # Data parallel: the global batch, --batch-size (per rank) x ranks; another number of ranks is fine.
    before, now = ([s.get("batch_size"), s.get("world_size") or 1] for s in (meta["settings"], settings))
    if before[0] * before[1] != now[0] * now[1]:
        changed.append(f"--batch-size {before[0]}" + (f" x {before[1]} ranks" if before[1] > 1 else "") +
                       f" (now {now[0]}" + (f" x {now[1]} ranks" if now[1] > 1 else "") + ")")
    if bool(meta["settings"].get("repeated_aug")) != bool(settings.get("repeated_aug")):  # another epoch order
        changed.append(f"--repeated-aug {bool(meta['settings'].get('repeated_aug'))} (now "
                       f"{bool(settings.get('repeated_aug'))})")
    if changed:
        raise ResumeError(f"{path} was trained with " + ", ".join(changed) + ": a resumed run continues "
                           "with the same optimizer, batch size, seed and epoch order (leave these flags out "
                           "to keep them)")


def check_not_rewinding(path, meta, output):
    """Resuming `path` (its meta) into the folder `output` must not go back past output/checkpoint.npz,
    e.g. --resume best.npz beside a newer checkpoint.npz: the run and its log would rewind (ResumeError). A branch
    off best.npz goes into another --output."""
    latest = Path(output) / "checkpoint.npz"
    if not latest.is_file() or latest.resolve() == Path(path).resolve():
        return
    ahead, behind = read_meta(latest)["position"], meta["position"]
    if ahead["global_step"] > behind["global_step"]:
        raise ResumeError(f"{path} stands at {where_it_stands(behind)}, but {latest} is further on (at "
                           f"{where_it_stands(ahead)}): resuming would rewind that run. Continue it with --resume "
                           f"{latest}, or branch off {Path(path).name} into another --output")


def where_it_stands(position):
    """A checkpoint's position in words: 'the end of epoch 3', or 'epoch 4, batch 120' inside one."""
    epoch, batch = position["epoch"], position["batch"]
    if batch == 0:
        return f"the end of epoch {epoch}" if epoch else "the start"
    return f"epoch {epoch + 1}, batch {batch}"

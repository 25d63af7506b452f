"""Classify images with trained ResMLP weights: the top classes of each image and their probabilities.

    python predict.py photo.jpg --weights runs/X/best.npz             # a train.py checkpoint knows its classes
    python predict.py photos/ --weights resmlp_12_224.safetensors --class-names LOC_synset_mapping.txt
    python predict.py a.png b.jpg --weights W --top 3 --device gpu --json
    python predict.py imagenet/val --weights runs/X/best.npz     # class folders: top-1/top-5 at the end

The model and the evaluation transform are the ones the weights were trained with: a train.py checkpoint
holds its model configuration, class list and settings (img_size, crop_pct); published weights (.npz or
.safetensors, official or timm names) hold only arrays, so the model is read from their shapes (or given
with --model) and crop_pct defaults to 0.875, as in DeiT's evaluation. Each image is resized (shorter
side to img_size / crop_pct, bicubic) and center-cropped to img_size, from any Pillow mode. A folder is
searched recursively for image files, as train.py finds them (minimlp.data.datasets.IMAGE_EXTENSIONS,
torchvision's list, any case, not hidden ones), sorted by path. A folder laid out as an ImageFolder, whose
sub-folders are all classes of a train.py checkpoint (a val/ split), labels its images: after them, one
line gives its top-1 and top-5 accuracy.

Any input a person must fix (a missing file, weights that do not fit, a class-name file of the wrong
length) is one line on stderr, exit status 2. An unreadable image is one such line too; the other images
are still classified, and the exit status is 2.
"""
import json
import math
import re
import sys
from pathlib import Path

import numpy as np

from minimlp import backend, create_model
from minimlp.training.checkpoint import is_training_checkpoint, load_checkpoint
from minimlp.training.command_line import ArgumentParser
from minimlp.data.datasets import IMAGE_EXTENSIONS, class_folders, list_images
from minimlp.data.loader import UNREADABLE_IMAGE_ERRORS
from minimlp.model import PRESETS, preset_name
from minimlp.data.device_feed import normalize
from minimlp.data.transforms import eval_transform
from minimlp.weights import WeightsError, read_weights, timm_to_official

DEFAULT_CROP_PCT = 0.875  # DeiT's and timm's evaluation of ResMLP
WNID = re.compile(r"n\d{8}")  # an ImageNet class id, as in LOC_synset_mapping.txt: "n01440764 tench, Tinca tinca"
# What create_model takes from a model configuration (a checkpoint's meta["model"]); drop_path is 0 to predict.
MODEL_SETTINGS = ("num_classes", "img_size", "patch_size", "dim", "depth", "layerscale_init", "in_chans", "mlp_ratio")


class PredictError(ValueError):
    """Input that a person must fix, said in one line that names the file or flag."""


def parse_args(argv=None):
    parser = ArgumentParser(
        description="Top classes and probabilities of images under trained ResMLP weights (a train.py checkpoint, "
                    "or published .npz/.safetensors weights), with the evaluation transform they were trained with.")
    a = parser.add_argument
    a("images", nargs="+", type=Path, metavar="IMAGE", help="image files or folders (searched recursively for "
                                                            f"{', '.join(IMAGE_EXTENSIONS)} files)")
    a("--weights", type=Path, required=True, help="a train.py checkpoint (checkpoint.npz, best.npz) or published "
                                                  "weights (.npz or .safetensors, official or timm names)")
    a("--class-names", type=Path, help="a text file with one class per line, in label order, e.g. ImageNet's "
                                       "LOC_synset_mapping.txt ('n01440764 tench, Tinca tinca'); default: the "
                                       "checkpoint's classes (published weights have none: class numbers are shown)")
    a("--device", choices=["auto", "cpu", "gpu"], default="auto", help="auto (default): the GPU if CuPy and one are "
                                                                       "present")
    a("--top", type=int, default=5, help="classes shown per image (default 5)")
    a("--model", type=preset_name, choices=sorted(PRESETS),
      help="the preset the weights are for (default: the checkpoint's, or read from the weights' shapes)")
    a("--img-size", type=int, help="input resolution (default: the checkpoint's, or the weights': patch size x "
                                   "patches per side)")
    a("--crop-pct", type=float, help=f"resize to img_size / crop_pct, then center crop (default: the checkpoint's "
                                     f"setting, else {DEFAULT_CROP_PCT})")
    a("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    a("--json", action="store_true", help="one JSON object per image on stdout: image, top [{class, index, "
                                          "probability}]")
    args = parser.parse_args(argv)
    if args.top < 1:
        parser.error(f"--top must be at least 1, got {args.top}")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.crop_pct is not None and not 0 < args.crop_pct <= 1:
        parser.error(f"--crop-pct must be in (0, 1] (the crop is that fraction of the resized image), "
                     f"got {args.crop_pct}")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (PredictError, WeightsError, backend.DeviceError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except backend.out_of_memory_errors() as error:
        print(f"error: {backend.out_of_memory_advice(args.batch_size, error)}, or --device cpu", file=sys.stderr)
        return 2


def run(args):
    paths = image_paths(args.images)
    device = backend.resolve_device(args.device)
    model, classes, crop_pct = load_model(args, device)
    labels = class_labels(args, classes, model.config["num_classes"])
    img_size = model.config["img_size"]
    print(f"{args.weights}: {describe(model.config)}; eval transform: resize to {int(img_size / crop_pct)} px, "
          f"center crop {img_size} px (crop_pct {crop_pct}); device {device}; {len(paths)} "
          f"image{'' if len(paths) == 1 else 's'}", file=sys.stderr)
    top = min(args.top, len(labels))
    scores = {folder: Accuracy(labels_of) for folder in args.images if (labels_of := folder_labels(folder, classes))}
    failed = 0
    for start in range(0, len(paths), args.batch_size):
        batch_paths, images = [], []
        for path in paths[start:start + args.batch_size]:
            try:
                images.append(eval_transform(path, img_size, crop_pct))
                batch_paths.append(path)
            except UNREADABLE_IMAGE_ERRORS as error:
                print(f"error: {path}: not a readable image ({error})", file=sys.stderr)
                failed += 1
        if not images:
            continue
        for path, row in zip(batch_paths, probabilities(model, np.stack(images))):
            ranked = np.argsort(-row, kind="stable")
            report(path, [(labels[index], int(index), float(row[index])) for index in ranked[:top]], args.json)
            for accuracy in scores.values():
                accuracy.add(path, ranked)
    for folder, accuracy in scores.items():
        accuracy.report(folder, args.json)
    return 2 if failed else 0


def folder_labels(folder, classes):
    """{image path: label} of a folder laid out as an ImageFolder whose sub-folders are all among `classes` (a
    checkpoint's); {} for any other folder, a file, or weights without classes."""
    if classes is None or not folder.is_dir():
        return {}
    names = class_folders(folder)
    if not names or any(name not in classes for name in names):
        return {}
    return {Path(path): classes.index(name) for name in names for path in list_images(folder / name)}


class Accuracy:
    """Top-1 and top-5 hits over the labelled images of one folder (labels_of: {path: label})."""

    def __init__(self, labels_of):
        self.labels_of = labels_of
        self.hits, self.count = np.zeros(2, dtype=np.int64), 0

    def add(self, path, ranked):
        """ranked: the class indices of one image's probabilities, most probable first."""
        if path in self.labels_of:
            label = self.labels_of[path]
            self.hits += [label == ranked[0], label in ranked[:5]]
            self.count += 1

    def report(self, folder, as_json):
        if not self.count:  # every labelled image unreadable: said above, one line each
            return
        top1, top5 = (100 * self.hits / self.count).tolist()
        classes = len(set(self.labels_of.values()))
        if as_json:
            print(json.dumps(dict(folder=str(folder), images=self.count, classes=classes, top1=top1, top5=top5)))
        else:
            print(f"{folder}: top-1 {top1:.2f}%  top-5 {top5:.2f}%  ({self.count} images of {classes} classes)")


def probabilities(model, images):
    """uint8 images (B, 3, S, S) -> softmax of the model's logits, float64 on the host (B, num_classes)."""
    logits = model.forward(normalize(backend.to_device(images, model.device), dtype=model.dtype))
    model.free_activations()
    logits = backend.to_numpy(logits).astype(np.float64)
    exponentials = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exponentials / exponentials.sum(axis=1, keepdims=True)


def report(path, top, as_json):
    """top: [(label, index, probability)], most probable first."""
    if as_json:
        print(json.dumps(dict(image=str(path), top=[dict(zip(("class", "index", "probability"), entry))
                                                    for entry in top])))
        return
    print(path)
    for label, _, probability in top:
        print(f"  {100 * probability:6.2f}%  {label}")


# ---------------------------------------------------------------- inputs

def image_paths(arguments):
    """The files named, and the image files under the folders named (recursively, sorted by path)."""
    paths = []
    for argument in arguments:
        if argument.is_dir():
            found = sorted(Path(path) for path in list_images(argument))  # by path: b/a/x before b/z
            if not found:
                raise PredictError(f"{argument}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
            paths.extend(found)
        elif argument.is_file():
            paths.append(argument)
        else:
            raise PredictError(f"{argument}: no such file or folder")
    return paths


def load_model(args, device):
    """(model with the weights loaded, class list or None, crop_pct): from a train.py checkpoint's own
    configuration, else from --model or the weights' shapes."""
    if is_training_checkpoint(args.weights):
        weights, _, meta = load_checkpoint(args.weights)
        config, classes = meta["model"], meta["classes"]
        crop_pct = meta["settings"].get("crop_pct") or DEFAULT_CROP_PCT
        if args.model and args.model != config["name"]:
            raise PredictError(f"--model {args.model}: {args.weights} is a {config['name']} checkpoint "
                               "(leave --model out: a checkpoint knows its model)")
    else:
        weights, classes, crop_pct = timm_to_official(read_weights(args.weights)), None, DEFAULT_CROP_PCT
        config = architecture_of(weights, args.weights)
        if args.model:
            config = {**PRESETS[args.model], "name": args.model, "num_classes": config["num_classes"],
                      "img_size": args.img_size or PRESETS[args.model]["img_size"]}
    if args.img_size and args.img_size != config["img_size"]:
        raise PredictError(f"--img-size {args.img_size}: {args.weights} was made for {config['img_size']} px "
                           f"images (patch {config['patch_size']}); leave --img-size out")
    model = create_model(config.get("name") or "resmlp_s12", device=device,
                         **{key: config[key] for key in MODEL_SETTINGS if key in config})
    try:
        model.load_state_dict(weights)
    except WeightsError as error:
        raise WeightsError(f"{args.weights}: {error}") from None
    return model, classes, args.crop_pct or crop_pct


def architecture_of(weights, path):
    """The model configuration that weights of these shapes (official names) belong to; its name is the
    preset of the same dim, depth and patch size, or None."""
    try:
        dim, in_chans, patch_size, _ = weights["patch_embed.proj.weight"].shape
        num_patches = weights["blocks.0.attn.weight"].shape[0]
        hidden = weights["blocks.0.mlp.fc1.weight"].shape[0]
        num_classes = weights["head.weight"].shape[0]
    except (KeyError, ValueError, IndexError):
        raise WeightsError(f"{path}: not ResMLP weights (no patch_embed.proj.weight, blocks.0.attn.weight, "
                           "blocks.0.mlp.fc1.weight or head.weight of the expected shape)") from None
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise WeightsError(f"{path}: blocks.0.attn.weight is {num_patches} x {num_patches}, not a square patch grid")
    depth = 0
    while f"blocks.{depth}.attn.weight" in weights:
        depth += 1
    config = dict(num_classes=int(num_classes), img_size=int(side * patch_size), patch_size=int(patch_size),
                  dim=int(dim), depth=depth, in_chans=int(in_chans), mlp_ratio=int(hidden) // int(dim))
    config["name"] = next((name for name, preset in PRESETS.items()
                           if (preset["dim"], preset["depth"], preset["patch_size"]) == (dim, depth, patch_size)), None)
    return config


def describe(config):
    name = config.get("name") or "ResMLP"
    return (f"{name} (dim {config['dim']}, depth {config['depth']}, patch {config['patch_size']}, "
            f"{config['img_size']} px, {config['num_classes']} classes)")


def class_labels(args, classes, num_classes):
    """What each of the model's outputs is called: --class-names (matched by class id to a checkpoint's
    classes when they are ids, else in order), else the checkpoint's classes, else "class <i>"."""
    if args.class_names is None:
        if classes is None:
            print(f"note: {args.weights} holds weights only, no class names: give --class-names (e.g. ImageNet's "
                  "LOC_synset_mapping.txt) to see names instead of class numbers", file=sys.stderr)
            return [f"class {index}" for index in range(num_classes)]
        return list(classes)
    entries = read_class_names(args.class_names)
    by_id = dict(entries)
    if classes is not None and all(name in by_id for name in classes):  # e.g. wnid folders + the synset mapping
        return [by_id[name] for name in classes]
    if len(entries) != num_classes:
        raise PredictError(f"--class-names {args.class_names}: {len(entries)} names, but {args.weights} has "
                           f"{num_classes} classes (one name per line, in label order)")
    return [label for _, label in entries]


def read_class_names(path):
    """[(class id, label)] from the non-empty lines of `path`: 'n01440764 tench, Tinca tinca' -> ('n01440764',
    'tench, Tinca tinca'); a line without a leading wnid is a label by itself (its own id)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise PredictError(f"--class-names {path}: no such file") from None
    except (UnicodeDecodeError, IsADirectoryError):
        raise PredictError(f"--class-names {path}: not a UTF-8 text file with one class per line") from None
    entries = []
    for line in lines:
        line = line.strip()
        if not line:
            continue
        first, _, rest = line.partition(" ")
        entries.append((first, rest.strip()) if WNID.fullmatch(first) and rest.strip() else (line, line))
    return entries


if __name__ == "__main__":
    sys.exit(main())

"""Finding the images: ImageNet-style folders on disk -> a list of (path, label).

Layout (torchvision's ImageFolder):

    DATA/train/<class>/*.JPEG      one folder per class; classes sorted by folder name -> label 0, 1, ...
    DATA/val/<class>/*.JPEG        labels come from the TRAIN class list

The original flat ILSVRC2012 validation folder is accepted too (DATA/val/*.JPEG, no class folders),
labelled by either
  - Kaggle's LOC_val_solution.csv (header `ImageId,PredictionString`; the prediction string begins
    with the wnid, e.g. `n01751748 101 57 413 380`), in DATA or DATA/val, or
  - the devkit: ILSVRC2012_validation_ground_truth.txt (one 1-based ILSVRC2012_ID per line, line i
    for ILSVRC2012_val_<i>.JPEG) plus meta.mat (ILSVRC2012_ID -> wnid), in DATA, DATA/val or
    DATA/ILSVRC2012_devkit_t12/data.

Image files are recognised by extension (IMAGE_EXTENSIONS, torchvision's ImageFolder's list; any case);
hidden files (names starting with '.', e.g. macOS '._x.jpg') and other files are ignored. Class folders are searched
recursively. Every problem a person can fix is a DataError whose message names the path and says
what to do.
"""
import csv
import os
from pathlib import Path

import scipy.io

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's
KAGGLE_SOLUTION = "LOC_val_solution.csv"
DEVKIT_GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
DEVKIT_META = "meta.mat"
LAYOUT_HINT = "expected DATA/train/<class>/*.JPEG and DATA/val/<class>/*.JPEG (torchvision ImageFolder layout)"


class DataError(Exception):
    """Something about the data on disk that a person has to fix; the message says what and where."""


class ImageFolder:
    """A labelled list of image files.

    classes: class names, index = label.  samples: list of (path str, label int).  root: the folder.
    """

    def __init__(self, root, classes, samples):
        self.root = Path(root)
        self.classes = list(classes)
        self.samples = list(samples)

    def __len__(self):
        return len(self.samples)

    def __repr__(self):
        return f"ImageFolder({str(self.root)!r}, {len(self.classes)} classes, {len(self)} images)"


def is_image_file(name):
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def list_images(folder):
    """Sorted paths (str) of the image files under `folder`, searched recursively. Links to folders are
    followed (a class kept on another disk), each real folder once: a link loop (a/again -> .) adds nothing."""
    paths, visited = [], set()
    for directory, subdirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(directory)
        if real in visited:  # reached again through a link
            subdirs.clear()
            continue
        visited.add(real)
        subdirs[:] = sorted(name for name in subdirs
                            if os.path.realpath(os.path.join(directory, name)) not in visited)
        paths.extend(os.path.join(directory, name) for name in sorted(names) if is_image_file(name))
    return paths


def class_folders(split_dir):
    """Sorted names of the visible sub-folders of `split_dir`."""
    return sorted(entry.name for entry in os.scandir(split_dir)
                  if entry.is_dir() and not entry.name.startswith("."))


def check_data_dir(data_dir):
    data_dir = Path(data_dir).expanduser()
    if not data_dir.is_dir():
        raise DataError(f"--data folder {data_dir} does not exist (or is not a folder). "
                        f"Point --data at your dataset; {LAYOUT_HINT}.")
    return data_dir


def split_dir(data_dir, split):
    folder = Path(data_dir) / split
    if not folder.is_dir():
        raise DataError(f"{data_dir} has no {split}/ folder. {LAYOUT_HINT}.")
    return folder


def load_train(data_dir):
    """The training set DATA/train/<class>/*; classes are the sorted class-folder names."""
    train_dir = split_dir(check_data_dir(data_dir), "train")
    classes = class_folders(train_dir)
    if not classes:
        raise DataError(f"{train_dir} has no class folders: put each class's images in its own "
                        f"sub-folder, {train_dir}/<class>/*.JPEG.")
    return ImageFolder(train_dir, classes, scan_class_folders(train_dir, classes, classes))


def load_val(data_dir, train_classes):
    """The validation set, labelled with the TRAIN class list `train_classes` (names, index = label).

    DATA/val/<class>/* if val has class folders, else the flat ILSVRC2012 folder with its labels.
    """
    val_dir = split_dir(check_data_dir(data_dir), "val")
    folders = class_folders(val_dir)
    if not folders:
        return load_flat_val(Path(data_dir), val_dir, train_classes)
    unknown = [name for name in folders if name not in train_classes]
    if unknown:
        raise DataError(f"{val_dir} has class folders that are not training classes: "
                        f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}. The val "
                        f"class folders must use the same names as {Path(data_dir) / 'train'}.")
    return ImageFolder(val_dir, train_classes, scan_class_folders(val_dir, folders, train_classes))


def load_datasets(data_dir):
    """(train, val) ImageFolders of DATA, val labelled with the train classes."""
    train = load_train(data_dir)
    return train, load_val(data_dir, train.classes)


def scan_class_folders(split_dir, folders, classes):
    """Samples of split_dir/<folder>/* for each folder, labelled by its index in `classes`."""
    label_of = {name: label for label, name in enumerate(classes)}
    samples, first_seen = [], {}  # real folder -> (class, the folder's path) where it was first found
    for name in folders:
        paths = list_images(split_dir / name)
        if not paths:
            raise DataError(f"class folder {split_dir / name} has no images (looked for "
                            f"{', '.join(IMAGE_EXTENSIONS)}): add images or remove the folder.")
        # a link into another class's folder would give its images a second label (the real path of each
        # folder, not of each file: a million realpath calls would add seconds to every start on ImageNet)
        for directory in dict.fromkeys(os.path.dirname(path) for path in paths):  # in order, each once
            first_class, first_directory = first_seen.setdefault(os.path.realpath(directory), (name, directory))
            if first_class != name:
                raise DataError(f"{first_directory} (class {first_class}) and {directory} (class {name}) are one "
                                "folder, reached through a link: an image can belong to one class only; remove the "
                                "link.")
        samples.extend((path, label_of[name]) for path in paths)
    return samples


def load_flat_val(data_dir, val_dir, train_classes):
    """A flat val folder (no class folders), labelled by LOC_val_solution.csv or the devkit."""
    paths = list_images(val_dir)
    if not paths:
        raise DataError(f"{val_dir} has neither class folders nor images. {LAYOUT_HINT}.")
    kaggle = find_file(KAGGLE_SOLUTION, [data_dir, val_dir])
    devkit_dirs = [data_dir, val_dir, data_dir / "ILSVRC2012_devkit_t12" / "data"]
    ground_truth = find_file(DEVKIT_GROUND_TRUTH, devkit_dirs)
    meta = find_file(DEVKIT_META, devkit_dirs)
    if kaggle:
        wnid_of = read_kaggle_solution(kaggle)
        label_source = kaggle
    elif ground_truth and meta:
        wnid_of = read_devkit_labels(ground_truth, meta)
        label_source = ground_truth
    else:
        raise DataError(f"{val_dir} holds images without class folders, and no labels were found "
                        f"for them: put {KAGGLE_SOLUTION} in {data_dir} or {val_dir}, or "
                        f"{DEVKIT_GROUND_TRUTH} with {DEVKIT_META} (ILSVRC2012 devkit), or sort the "
                        f"images into {val_dir}/<class>/ folders.")
    return ImageFolder(val_dir, train_classes, label_flat_images(paths, wnid_of, label_source, train_classes))


def find_file(name, folders):
    for folder in folders:
        if (folder / name).is_file():
            return folder / name
    return None


def label_flat_images(paths, wnid_of, label_source, train_classes):
    """Samples for `paths`, labelled via wnid_of[file stem] -> index in train_classes."""
    label_of = {name: label for label, name in enumerate(train_classes)}
    samples = []
    for path in paths:
        image_id = Path(path).stem
        if image_id not in wnid_of:
            raise DataError(f"{path} has no label in {label_source}: remove the image or use the "
                            f"label file that belongs to this validation set.")
        wnid = wnid_of[image_id]
        if wnid not in label_of:
            raise DataError(f"{label_source} labels {image_id} as class {wnid}, which is not a "
                            f"training class (no folder train/{wnid}).")
        samples.append((path, label_of[wnid]))
    return samples


def read_kaggle_solution(csv_path):
    """{image id: wnid} from Kaggle's LOC_val_solution.csv."""
    try:
        return parse_kaggle_solution(csv_path)
    except (UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"{csv_path} is not a readable CSV file ({error}): expected Kaggle's "
                        "LOC_val_solution.csv, text starting with 'ImageId,PredictionString'.") from None


def parse_kaggle_solution(csv_path):
    with open(csv_path, newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file)
        if reader.fieldnames is None or not {"ImageId", "PredictionString"} <= set(reader.fieldnames):
            raise DataError(f"{csv_path} should start with the header 'ImageId,PredictionString' "
                            f"(Kaggle's ImageNet localization format); found {reader.fieldnames}.")
        wnid_of = {}
        for line_number, row in enumerate(reader, start=2):
            words = (row["PredictionString"] or "").split()
            if not words:
                raise DataError(f"{csv_path} line {line_number}: empty PredictionString for {row['ImageId']}.")
            wnid_of[row["ImageId"]] = words[0]
    return wnid_of


def read_devkit_labels(ground_truth_path, meta_path):
    """{image id: wnid} from the devkit: line i of the ground truth is ILSVRC2012_val_<i:08d>."""
    wnid_of_id = read_devkit_wnids(meta_path)
    wnid_of = {}
    with open(ground_truth_path, errors="replace") as file:
        for index, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                ilsvrc_id = int(line)
            except ValueError:
                raise DataError(f"{ground_truth_path} line {index}: {line.strip()[:40]!r} is not an ILSVRC2012_ID "
                                "(one number per line).") from None
            if ilsvrc_id not in wnid_of_id:
                raise DataError(f"{ground_truth_path} line {index}: ILSVRC2012_ID {ilsvrc_id} is not in {meta_path}.")
            wnid_of[f"ILSVRC2012_val_{index:08d}"] = wnid_of_id[ilsvrc_id]
    return wnid_of


def read_devkit_wnids(meta_path):
    """{ILSVRC2012_ID: wnid} from the devkit's meta.mat (struct array `synsets`)."""
    try:
        synsets = scipy.io.loadmat(meta_path, squeeze_me=True)["synsets"]
        return {int(ilsvrc_id): str(wnid) for ilsvrc_id, wnid in zip(synsets["ILSVRC2012_ID"], synsets["WNID"])}
    except Exception as error:  # scipy's MatReadError, a missing field, ... : not the devkit's meta.mat
        raise DataError(f"{meta_path} is not the ILSVRC2012 devkit's meta.mat ({type(error).__name__}: {error}): "
                        "take it from ILSVRC2012_devkit_t12/data.") from None


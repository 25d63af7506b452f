"""The data pipeline: folders -> samples -> decoded, augmented uint8 arrays -> batches -> normalized."""
import csv
import multiprocessing

import numpy as np
import pytest
import scipy.io
from PIL import Image, JpegImagePlugin

from minimlp.data import synthetic
from minimlp.backend import to_numpy
from minimlp.data.datasets import DataError, load_datasets, load_train
from minimlp.data.loader import Loader
from minimlp.data.randaugment import RandAugment
from minimlp.data.sampler import RepeatedAugmentationSampler
from minimlp.data.device_feed import IMAGENET_MEAN, IMAGENET_STD, normalize
from minimlp.data.transforms import (eval_crop_box, eval_resize_size, eval_transform, random_resized_crop_box, to_chw,
                                     train_transform)
from minimlp.tools.pytorch_references import timm, torch, torchvision
from tests.imagetools import load_rgb, make_image, make_image_folder, save_image, smooth_rgb


# ---------------------------------------------------------------- datasets: layout

def test_layout_classes_sorted_and_images_by_extension(tmp_path):
    make_image_folder(tmp_path, classes=("zebra", "ant", "moth"), per_class=2)
    save_image(tmp_path / "train" / "ant" / "UPPER.JPG")
    save_image(tmp_path / "train" / "ant" / "mixed.Png")
    save_image(tmp_path / "train" / "ant" / "nested" / "deep.webp")
    save_image(tmp_path / "train" / "ant" / "bitmap.bmp")
    save_image(tmp_path / "train" / "ant" / "._macos_shadow.jpg")
    (tmp_path / "train" / "ant" / "notes.txt").write_text("not an image")

    train, val = load_datasets(tmp_path)

    assert train.classes == ["ant", "moth", "zebra"]
    ant_files = sorted(path.rsplit("/", 1)[1] for path, label in train.samples if label == 0)
    assert ant_files == ["UPPER.JPG", "bitmap.bmp", "deep.webp", "img0.jpg", "img1.jpg", "mixed.Png"]
    assert len(train) == 6 + 2 + 2
    assert [label for _, label in train.samples] == [0] * 6 + [1, 1, 2, 2]
    assert all(f"/train/{train.classes[label]}/" in path for path, label in train.samples)
    assert val.classes == train.classes and len(val) == 6


def test_val_with_fewer_classes_keeps_train_labels(tmp_path):
    make_image_folder(tmp_path, classes=("ant", "moth", "zebra"), per_class=2, splits=("train",))
    make_image_folder(tmp_path, classes=("zebra",), per_class=2, splits=("val",))
    train, val = load_datasets(tmp_path)
    assert val.classes == train.classes
    assert [label for _, label in val.samples] == [2, 2]


# ---------------------------------------------------------------- datasets: errors for people

def test_a_class_folder_lists_the_files_torchvisions_image_folder_lists(tmp_path):
    names = ["a.jpg", "b.JPEG", "c.png", "d.ppm", "e.bmp", "f.pgm", "g.tif", "h.TIFF", "i.webp", "j.gif", "k.txt",
             "l.jpg.bak"]
    for class_name in ("cat", "dog"):
        for name in names:
            (tmp_path / "train" / class_name).mkdir(parents=True, exist_ok=True)
            (tmp_path / "train" / class_name / name).write_bytes(b"")  # listing opens no file
    theirs = torchvision.datasets.ImageFolder(str(tmp_path / "train"), loader=lambda path: path)
    assert sorted(load_train(tmp_path).samples) == sorted(theirs.samples)


def test_missing_data_folder_names_path_and_flag(tmp_path):
    with pytest.raises(DataError, match=r"--data folder .*nowhere does not exist"):
        load_train(tmp_path / "nowhere")


@pytest.mark.parametrize("split", ["train", "val"])
def test_missing_split_folder(tmp_path, split):
    make_image_folder(tmp_path, splits=[other for other in ("train", "val") if other != split])
    with pytest.raises(DataError, match=rf"{tmp_path} has no {split}/ folder"):
        load_datasets(tmp_path)


def test_no_class_folders(tmp_path):
    (tmp_path / "train").mkdir()
    save_image(tmp_path / "train" / "loose.jpg")
    with pytest.raises(DataError, match=r"train has no class folders"):
        load_train(tmp_path)


def test_empty_class_folder_is_named(tmp_path):
    make_image_folder(tmp_path, classes=("ant", "moth"))
    (tmp_path / "train" / "empty_one").mkdir()
    (tmp_path / "train" / "empty_one" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"class folder .*train/empty_one has no images"):
        load_train(tmp_path)


def test_val_class_not_in_train(tmp_path):
    make_image_folder(tmp_path, classes=("ant", "moth"), splits=("train",))
    make_image_folder(tmp_path, classes=("ant", "wasp"), splits=("val",))
    with pytest.raises(DataError, match=r"not training classes: wasp"):
        load_datasets(tmp_path)


def test_flat_val_without_labels_says_what_to_add(tmp_path):
    make_image_folder(tmp_path, classes=("n01", "n02"), splits=("train",))
    save_image(tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG")
    with pytest.raises(DataError, match=r"LOC_val_solution.csv"):
        load_datasets(tmp_path)


# ---------------------------------------------------------------- datasets: flat ILSVRC2012 val

WNIDS = ("n01440764", "n01443537", "n01484850")  # train class folders (sorted -> labels 0, 1, 2)
FLAT_VAL_WNIDS = ("n01484850", "n01440764", "n01484850", "n01443537")  # val image i+1's class


def make_flat_val(tmp_path):
    make_image_folder(tmp_path, classes=WNIDS, per_class=1, splits=("train",))
    for number in range(1, len(FLAT_VAL_WNIDS) + 1):
        save_image(tmp_path / "val" / f"ILSVRC2012_val_{number:08d}.JPEG", seed=number)


def write_kaggle_solution(path, rows):
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["ImageId", "PredictionString"])
        writer.writerows(rows)


@pytest.mark.parametrize("csv_folder", ["", "val"])
def test_flat_val_with_kaggle_solution(tmp_path, csv_folder):
    make_flat_val(tmp_path)
    rows = [(f"ILSVRC2012_val_{number:08d}", f"{wnid} 10 20 110 120 {wnid} 1 2 3 4")
            for number, wnid in reversed(list(enumerate(FLAT_VAL_WNIDS, start=1)))]
    write_kaggle_solution(tmp_path / csv_folder / "LOC_val_solution.csv", rows)

    train, val = load_datasets(tmp_path)

    assert val.classes == list(WNIDS)
    assert [path.rsplit("/", 1)[1] for path, _ in val.samples] == [
        f"ILSVRC2012_val_{number:08d}.JPEG" for number in range(1, 5)]
    assert [label for _, label in val.samples] == [2, 0, 2, 1]


def test_flat_val_image_missing_from_solution(tmp_path):
    make_flat_val(tmp_path)
    write_kaggle_solution(tmp_path / "LOC_val_solution.csv", [("ILSVRC2012_val_00000001", "n01484850 1 2 3 4")])
    with pytest.raises(DataError, match=r"ILSVRC2012_val_00000002.JPEG has no label in .*LOC_val_solution.csv"):
        load_datasets(tmp_path)


def test_flat_val_label_not_a_train_class(tmp_path):
    make_flat_val(tmp_path)
    rows = [(f"ILSVRC2012_val_{number:08d}", "n09999999 1 2 3 4") for number in range(1, 5)]
    write_kaggle_solution(tmp_path / "LOC_val_solution.csv", rows)
    with pytest.raises(DataError, match=r"class n09999999, which is not a training class"):
        load_datasets(tmp_path)


def test_flat_val_with_devkit_ground_truth(tmp_path):
    make_flat_val(tmp_path)
    devkit = tmp_path / "ILSVRC2012_devkit_t12" / "data"
    devkit.mkdir(parents=True)
    # devkit ids are NOT in wnid order: the labels must come from the train class list, not the ids
    id_of_wnid = {"n01484850": 1, "n01440764": 2, "n01443537": 3}
    synsets = np.array([(ilsvrc_id, wnid) for wnid, ilsvrc_id in id_of_wnid.items()],
                       dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O")])
    scipy.io.savemat(devkit / "meta.mat", {"synsets": synsets})
    (devkit / "ILSVRC2012_validation_ground_truth.txt").write_text(
        "".join(f"{id_of_wnid[wnid]}\n" for wnid in FLAT_VAL_WNIDS))

    train, val = load_datasets(tmp_path)

    assert [label for _, label in val.samples] == [2, 0, 2, 1]


# ---------------------------------------------------------------- transforms: decoding every mode

def gray_of(rgb):
    return np.asarray(Image.fromarray(rgb).convert("L"))


@pytest.mark.parametrize("mode", ["L", "LA"])
def test_gray_png_modes_repeat_gray_in_rgb(tmp_path, mode):
    path = save_image(tmp_path / "gray.png", mode=mode, seed=3)
    expected_gray = gray_of(smooth_rgb((40, 30), seed=3))
    assert np.array_equal(load_rgb(path), np.stack([expected_gray] * 3))


def test_sixteen_bit_png_keeps_top_eight_bits(tmp_path):
    path = save_image(tmp_path / "deep.png", mode="I;16", seed=4)
    with Image.open(path) as image:
        assert image.mode == "I;16"
    expected_gray = gray_of(smooth_rgb((40, 30), seed=4))  # saved as gray * 257, so >> 8 gives gray back
    assert np.array_equal(load_rgb(path), np.stack([expected_gray] * 3))


def test_palette_png_looks_up_palette(tmp_path):
    path = save_image(tmp_path / "palette.png", mode="P", seed=5)
    with Image.open(path) as image:
        palette = np.array(image.getpalette()).reshape(-1, 3)
        expected = palette[np.asarray(image)].transpose(2, 0, 1)
    assert np.array_equal(load_rgb(path), expected)


def test_palette_png_with_transparency(tmp_path):
    image = make_image((40, 30), "P", seed=6)
    image.save(tmp_path / "transparent.png", transparency=0)
    palette = np.array(image.getpalette()).reshape(-1, 3)
    assert np.array_equal(load_rgb(tmp_path / "transparent.png"), palette[np.asarray(image)].transpose(2, 0, 1))


def test_rgba_png_drops_alpha(tmp_path):
    path = save_image(tmp_path / "alpha.png", mode="RGBA", seed=7)
    assert np.array_equal(load_rgb(path), smooth_rgb((40, 30), seed=7).transpose(2, 0, 1))


@pytest.mark.parametrize("name, mode", [("rgb.jpg", "RGB"), ("cmyk.jpg", "CMYK"), ("rgb.webp", "RGB"),
                                        ("rgb.bmp", "RGB")])
def test_lossy_and_other_formats_decode_close_to_source(tmp_path, name, mode):
    path = save_image(tmp_path / name, size=(64, 48), mode=mode, seed=8)
    with Image.open(path) as image:
        assert image.mode == mode
    decoded = load_rgb(path).astype(np.int64)
    source = smooth_rgb((64, 48), seed=8).transpose(2, 0, 1).astype(np.int64)
    assert decoded.shape == (3, 48, 64)
    assert np.abs(decoded - source).mean() < 6  # JPEG loss; swapped or inverted channels are off by tens


# ---------------------------------------------------------------- transforms: draft mode on large JPEGs

@pytest.fixture
def draft_scales(monkeypatch):
    """Records the shrink factor (1, 2, 4, 8) of every JPEG draft call."""
    scales = []
    original_draft = JpegImagePlugin.JpegImageFile.draft

    def recording_draft(image, mode, size):
        width = image.width
        result = original_draft(image, mode, size)
        scales.append(round(width / result[1][2]))
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", recording_draft)
    return scales


def full_decode(path):
    with Image.open(path) as image:
        return image.convert("RGB")


def test_large_jpeg_eval_decodes_in_full_unless_draft_is_asked(tmp_path, draft_scales):
    path = save_image(tmp_path / "large.jpg", size=(1600, 1200), seed=9)
    resized_w, resized_h = eval_resize_size(1600, 1200, 64)  # 97 x 73, crop at (16, 4)
    plain = to_chw(full_decode(path).resize((resized_w, resized_h), Image.Resampling.BICUBIC).crop(
        (16, 4, 80, 68))).astype(np.int64)
    assert np.array_equal(eval_transform(path, 64), plain)
    assert draft_scales == []  # evaluation: no draft mode by default
    drafted = eval_transform(path, 64, draft=True).astype(np.int64)
    assert draft_scales == [8]  # 1200 px short side, 73 px needed
    assert np.abs(drafted - plain).mean() < 1.5
    assert np.abs(drafted - plain).max() <= 12


def photo_like(size, seed):
    """A JPEG-able PIL image with photo-like detail at every scale: smooth colour blobs and pixel grain."""
    rng = np.random.default_rng(seed)
    width, height = size
    coarse = Image.fromarray(rng.integers(0, 256, size=(24, 32, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    grain = rng.integers(-12, 13, size=(height, width, 3))
    return Image.fromarray(np.clip(np.asarray(coarse) + grain, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (333, 500), (1200, 900), (2048, 1536)])
def test_eval_crop_equals_timms_eval_transform(tmp_path, size):
    """timm's create_transform(is_training=False) with DeiT's settings (bicubic, crop_pct 0.875), fed the
    fully decoded RGB image as timm's dataset does: our pixels within 1 level, on small and large JPEGs.
    Draft mode, on the large ones, is not (the test can tell it)."""
    path = tmp_path / "photo.jpg"
    photo_like(size, seed=14).save(path, quality=90)
    timm_eval = timm.data.create_transform(224, is_training=False, interpolation="bicubic", crop_pct=0.875,
                                           use_prefetcher=True)  # uint8 (3, 224, 224), not normalized
    with Image.open(path) as image:
        expected = timm_eval(image.convert("RGB")).numpy().astype(np.int64)
    difference = np.abs(eval_transform(path, 224, crop_pct=0.875).astype(np.int64) - expected)
    assert difference.shape == (3, 224, 224)
    assert difference.max() <= 1 and (difference > 0).mean() < 0.01  # the same steps: equal, in practice
    if min(size) >= 900:
        assert np.abs(eval_transform(path, 224, draft=True).astype(np.int64) - expected).max() > 1


def test_large_jpeg_train_crop_uses_draft_and_matches_full_decode(tmp_path, draft_scales):
    path = save_image(tmp_path / "large.jpg", size=(1600, 1200), seed=10)
    for seed in range(4):
        drafted = train_transform(path, 64, np.random.default_rng(seed)).astype(np.int64)
        rng = np.random.default_rng(seed)
        left, top, crop_w, crop_h = random_resized_crop_box(1600, 1200, rng)
        crop = full_decode(path).crop((left, top, left + crop_w, top + crop_h)).resize((64, 64),
                                                                                      Image.Resampling.BILINEAR)
        plain = to_chw(crop)[:, :, ::-1] if rng.random() < 0.5 else to_chw(crop)
        assert np.abs(drafted - plain).mean() < 2
        assert len(draft_scales) == seed + 1
        assert min(crop_w, crop_h) / draft_scales[-1] >= 64  # the reduced crop still covers the output
    assert max(draft_scales) > 1


# ---------------------------------------------------------------- transforms: geometry

def test_eval_transform_geometry_by_hand(tmp_path):
    """Ramp image: red = x, green = 2y, blue = 255 - x. Bicubic reproduces ramps, so every output pixel
    tells which source point it came from."""
    width, height = 200, 100
    y, x = np.mgrid[0:height, 0:width]
    ramp = np.stack([x, 2 * y, 255 - x], axis=-1).astype(np.uint8)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")

    out = eval_transform(tmp_path / "ramp.png", 32, crop_pct=0.875).astype(np.float64)

    # shorter side 100 -> int(32 / 0.875) = 36: resized to 72 x 36, scale 0.36; center crop at left 20, top 2
    assert eval_resize_size(width, height, 32) == (72, 36)
    source_x = (20 + np.arange(32) + 0.5) / 0.36 - 0.5
    source_y = (2 + np.arange(32) + 0.5) / 0.36 - 0.5
    interior = slice(1, 31)  # rows whose bicubic support (2 / 0.36 source px) stays inside the image
    assert out.shape == (3, 32, 32)
    np.testing.assert_allclose(out[0], np.broadcast_to(source_x, (32, 32)), atol=1)
    np.testing.assert_allclose(out[2], 255 - np.broadcast_to(source_x, (32, 32)), atol=1)
    np.testing.assert_allclose(out[1][interior], np.broadcast_to(2 * source_y[interior, None], (30, 32)), atol=1)


@pytest.mark.parametrize("size, img_size, crop_pct", [((200, 100), 32, 0.875), ((100, 250), 64, 0.9),
                                                     ((640, 480), 224, 0.9), ((333, 517), 224, 0.875),
                                                     ((48, 40), 24, 0.875)])
def test_eval_transform_is_deits_resize_then_center_crop(tmp_path, size, img_size, crop_pct):
    """The evaluation transform of deit's README_resmlp.md (docs/reference.md, Evaluation transform),
    built from torchvision: Resize(int(img_size / crop_pct), bicubic), then CenterCrop(img_size). We take
    the same two steps, so the pixels are the same."""
    path = save_image(tmp_path / "image.png", size=size, seed=13)
    transforms = torchvision.transforms
    deit = transforms.Compose([transforms.Resize(int(img_size / crop_pct), transforms.InterpolationMode.BICUBIC),
                               transforms.CenterCrop(img_size)])
    with Image.open(path) as image:
        assert transforms.Resize(int(img_size / crop_pct))(image).size == eval_resize_size(*size, img_size, crop_pct)
        expected = to_chw(deit(image.convert("RGB"))).astype(np.int64)
    assert np.array_equal(eval_transform(path, img_size, crop_pct), expected)


def test_eval_resize_and_crop_of_portrait_image():
    assert eval_resize_size(100, 250, 224, crop_pct=0.9) == (248, 620)
    assert eval_crop_box(100, 250, 224, crop_pct=0.9) == pytest.approx(
        (12 / 2.48, 198 / 2.48, 236 / 2.48, 422 / 2.48))


def test_random_resized_crop_boxes_follow_scale_and_ratio():
    for seed in range(200):
        left, top, crop_w, crop_h = random_resized_crop_box(300, 200, np.random.default_rng(seed))
        assert 0 <= left and left + crop_w <= 300 and 0 <= top and top + crop_h <= 200
        assert 0.08 * 0.9 <= crop_w * crop_h / (300 * 200) <= 1.0
        assert 3 / 4 * 0.9 <= crop_w / crop_h <= 4 / 3 * 1.1


class TorchDraws:
    """A stand-in for a numpy Generator that hands out the numbers torch's global generator gives, in
    the order torchvision's RandomResizedCrop.get_params draws them (area, log aspect ratio, top, left)."""

    def uniform(self, low, high):
        return torch.empty(1).uniform_(low, high).item()

    def integers(self, low, high):
        return int(torch.randint(low, high, size=(1,)).item())


@pytest.mark.parametrize("width, height", [(300, 200), (500, 375), (37, 1000), (400, 10), (224, 224)])
def test_random_resized_crop_box_is_torchvisions(width, height):
    """Fed the same random numbers, our box equals torchvision's RandomResizedCrop.get_params, including
    its retries and its fallback (400 x 10 and 37 x 1000 reach it)."""
    image = Image.new("RGB", (width, height))
    for seed in range(100):
        torch.manual_seed(seed)
        top, left, crop_h, crop_w = torchvision.transforms.RandomResizedCrop.get_params(
            image, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
        torch.manual_seed(seed)
        assert random_resized_crop_box(width, height, TorchDraws()) == (left, top, crop_w, crop_h), seed


def test_random_resized_crop_falls_back_to_clamped_center_crop():
    # 400 x 10: any crop of >= 8% area with ratio <= 4/3 is taller than 10 px, so all 10 tries fail
    assert random_resized_crop_box(400, 10, np.random.default_rng(0)) == ((400 - 13) // 2, 0, 13, 10)
    assert random_resized_crop_box(10, 400, np.random.default_rng(0)) == (0, (400 - 13) // 2, 10, 13)


def test_train_transform_is_crop_then_flip_from_the_generator(tmp_path):
    """Lossless PNG without draft: equals the crop and flip done by hand, exactly."""
    path = save_image(tmp_path / "small.png", size=(48, 40), seed=11)
    source = Image.open(path).convert("RGB")
    flips = set()
    for seed in range(8):
        out = train_transform(path, 24, np.random.default_rng(seed))
        rng = np.random.default_rng(seed)
        left, top, crop_w, crop_h = random_resized_crop_box(48, 40, rng)
        expected = to_chw(torchvision.transforms.functional.resized_crop(
            source, top, left, crop_h, crop_w, [24, 24], torchvision.transforms.InterpolationMode.BILINEAR))
        flipped = rng.random() < 0.5
        flips.add(flipped)
        assert out.shape == (3, 24, 24) and out.dtype == np.uint8
        assert np.array_equal(out, expected[:, :, ::-1] if flipped else expected)
        assert np.array_equal(out, train_transform(path, 24, np.random.default_rng(seed)))
    assert flips == {True, False}


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_train_crop_is_torchvisions_resized_crop_pixel_for_pixel(tmp_path, interpolation):
    """RandomResizedCrop's crop then resize (torchvision's F.resized_crop on the PIL image) with the train
    filter: equal in every pixel, the crop's edges included, on noise (which shows any pixel read from
    outside the box), for boxes inside the image, at its edges and the whole image."""
    path = save_image(tmp_path / "noise.png", size=(48, 40), seed=15)
    source = Image.open(path).convert("RGB")
    mode = torchvision.transforms.InterpolationMode[interpolation.upper()]
    scales = [(0.08, 1.0)] * 6 + [(1.0, 1.0)]
    for seed, scale in enumerate(scales):
        out = train_transform(path, 24, np.random.default_rng(seed), scale, interpolation=interpolation, hflip=0.0)
        left, top, crop_w, crop_h = random_resized_crop_box(48, 40, np.random.default_rng(seed), scale)
        expected = to_chw(torchvision.transforms.functional.resized_crop(source, top, left, crop_h, crop_w, [24, 24],
                                                                         mode))
        assert np.array_equal(out, expected), (seed, (left, top, crop_w, crop_h))


def test_random_train_interpolation_draws_the_filter_after_the_box(tmp_path):
    """timm's 'random': bilinear or bicubic, chosen per image (after the crop box)."""
    path = save_image(tmp_path / "small.png", size=(48, 40), seed=16)
    source = Image.open(path).convert("RGB")
    chosen = []
    for seed in range(12):
        out = train_transform(path, 24, np.random.default_rng(seed), interpolation="random", hflip=0.0)
        rng = np.random.default_rng(seed)
        left, top, crop_w, crop_h = random_resized_crop_box(48, 40, rng)
        resample = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)[rng.integers(2)]
        chosen.append(resample)
        assert np.array_equal(out, to_chw(source.crop((left, top, left + crop_w, top + crop_h)).resize((24, 24),
                                                                                                     resample)))
    assert set(chosen) == {Image.Resampling.BILINEAR, Image.Resampling.BICUBIC}
    with pytest.raises(ValueError, match="--train-interpolation 'nearest'"):
        train_transform(path, 24, np.random.default_rng(0), interpolation="nearest")


def test_hflip_probability(tmp_path):
    path = save_image(tmp_path / "small.png", size=(48, 40), seed=17)
    for seed in range(6):
        never = train_transform(path, 24, np.random.default_rng(seed), hflip=0.0)
        always = train_transform(path, 24, np.random.default_rng(seed), hflip=1.0)
        assert np.array_equal(always, never[:, :, ::-1])  # the same crop: the flip draw is always made


def test_randaugment_comes_after_crop_and_flip_from_the_same_generator(tmp_path):
    path = save_image(tmp_path / "small.png", size=(48, 40), seed=18)
    augment = RandAugment("rand-m9-mstd0.5-inc1", interpolation="bicubic")
    changed = 0
    for seed in range(6):
        out = train_transform(path, 24, np.random.default_rng(seed), interpolation="bicubic", auto_augment=augment)
        rng = np.random.default_rng(seed)
        left, top, crop_w, crop_h = random_resized_crop_box(48, 40, rng)
        crop = Image.open(path).convert("RGB").crop((left, top, left + crop_w, top + crop_h)).resize(
            (24, 24), Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        plain = to_chw(crop)
        expected = to_chw(augment(crop, rng))
        assert np.array_equal(out, expected)
        changed += not np.array_equal(out, plain)
    assert changed >= 3


# ---------------------------------------------------------------- normalize

def test_normalize_matches_torchvision_with_timms_constants(xp):
    """ToTensor's / 255, then torchvision's Normalize with timm's ImageNet mean and std."""
    assert IMAGENET_MEAN == timm.data.IMAGENET_DEFAULT_MEAN and IMAGENET_STD == timm.data.IMAGENET_DEFAULT_STD
    batch = np.random.default_rng(12).integers(0, 256, (2, 3, 5, 4), dtype=np.uint8)
    batch[0, :, 0, 0] = (0, 128, 255)
    expected = torchvision.transforms.functional.normalize(
        torch.from_numpy(batch).double() / 255, timm.data.IMAGENET_DEFAULT_MEAN, timm.data.IMAGENET_DEFAULT_STD).numpy()

    result64 = normalize(xp.asarray(batch), dtype="float64")
    result32 = normalize(xp.asarray(batch))

    assert result64.dtype == np.float64 and result32.dtype == np.float32
    assert isinstance(result32, type(xp.asarray(batch)))  # stays on the device it came from
    np.testing.assert_allclose(to_numpy(result64), expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(to_numpy(result32), expected, rtol=1e-6, atol=1e-6)


def test_normalize_rejects_float_input():
    with pytest.raises(ValueError, match=r"uint8 batch of shape \(B, 3, H, W\)"):
        normalize(np.ones((1, 3, 2, 2), dtype=np.float32))


# ---------------------------------------------------------------- loader

@pytest.fixture
def small_set(tmp_path):
    """3 classes x 7 images of mixed modes and sizes -> 21 samples."""
    make_image_folder(tmp_path, classes=("ant", "bee", "cow"), per_class=7, size=(40, 30),
                      modes=("RGB", "L", "P", "RGBA", "CMYK"), splits=("train",))
    return load_train(tmp_path)


def all_batches(loader, epoch, start_batch=0):
    return list(loader.epoch(epoch, start_batch))


def assert_same_batches(batches, other_batches):
    assert len(batches) == len(other_batches)
    for (images, labels), (other_images, other_labels) in zip(batches, other_batches):
        assert np.array_equal(images, other_images) and np.array_equal(labels, other_labels)


def test_loader_batches_do_not_depend_on_workers(small_set):
    serial = all_batches(Loader(small_set, 4, train=True, img_size=16, seed=3, workers=0), epoch=1)
    with Loader(small_set, 4, train=True, img_size=16, seed=3, workers=2, prefetch=3) as loader:
        parallel = all_batches(loader, epoch=1)
    assert len(serial) == 5
    assert serial[0][0].shape == (4, 3, 16, 16) and serial[0][0].dtype == np.uint8
    assert serial[0][1].dtype == np.int64
    assert_same_batches(serial, parallel)


def test_loader_resume_equals_tail_of_full_epoch(small_set):
    loader = Loader(small_set, 4, train=True, img_size=16, seed=3, workers=0)
    assert_same_batches(all_batches(loader, 2, start_batch=3), all_batches(loader, 2)[3:])


def test_train_epochs_shuffle_differently_and_drop_last(small_set):
    loader = Loader(small_set, 4, train=True, img_size=16, seed=3, workers=0)
    first, second = loader.epoch_order(0), loader.epoch_order(1)
    assert sorted(first) == list(range(21)) and not np.array_equal(first, second)
    assert np.array_equal(first, Loader(small_set, 4, True, 16, seed=3).epoch_order(0))
    batches = all_batches(loader, 0)
    assert len(loader) == len(batches) == 21 // 4
    assert all(len(labels) == 4 for _, labels in batches)
    labels = np.concatenate([labels for _, labels in batches])
    assert np.array_equal(labels, [small_set.samples[index][1] for index in first[:20]])
    other_seed = all_batches(Loader(small_set, 4, train=True, img_size=16, seed=4, workers=0), 0)
    assert not np.array_equal(batches[0][0], other_seed[0][0])


def test_train_augmentation_is_seeded_by_seed_epoch_and_position(small_set):
    loader = Loader(small_set, 4, train=True, img_size=16, seed=3, workers=0)
    order = loader.epoch_order(7)
    images, labels = all_batches(loader, 7, start_batch=2)[0]
    for offset in range(4):
        position = 2 * 4 + offset
        path, label = small_set.samples[order[position]]
        expected = train_transform(path, 16, np.random.default_rng([3, 7, position]))
        assert labels[offset] == label and np.array_equal(images[offset], expected)


def test_loader_takes_order_and_augmentation_seeds_from_the_sampler(small_set):
    """--repeated-aug: each image three times in a row, each copy augmented by its own global position, and
    two ranks' shards (data parallel) interleave into the one-process images, pixel for pixel; the train
    options (interpolation, hflip, RandAugment) reach every worker's transform."""
    options = dict(train=True, img_size=16, seed=3, workers=0, interpolation="bicubic", hflip=0.0,
                   auto_augment=RandAugment("rand-m9-mstd0.5-inc1"))
    one = Loader(small_set, 3, sampler=RepeatedAugmentationSampler(21, seed=3), **options)
    order = one.epoch_order(1)
    assert len(one) == 7 and order[0] == order[1] == order[2] != order[3]
    images = np.concatenate([batch for batch, _ in all_batches(one, 1)])
    assert not np.array_equal(images[0], images[1]) and not np.array_equal(images[1], images[2])
    path = small_set.samples[order[4]][0]
    expected = train_transform(path, 16, np.random.default_rng([3, 1, 4]), interpolation="bicubic", hflip=0.0,
                               auto_augment=RandAugment("rand-m9-mstd0.5-inc1"))
    assert np.array_equal(images[4], expected)
    shards = [Loader(small_set, 3, sampler=RepeatedAugmentationSampler(21, seed=3, num_replicas=2, rank=rank),
                     **options) for rank in (0, 1)]
    shard_images = [np.concatenate([batch for batch, _ in all_batches(shard, 1)]) for shard in shards]
    interleaved = np.empty_like(images[:18])
    interleaved[0::2], interleaved[1::2] = shard_images
    assert np.array_equal(interleaved, images[:18])


def test_eval_keeps_order_and_last_partial_batch(small_set):
    loader = Loader(small_set, 4, train=False, img_size=16, workers=0)
    batches = all_batches(loader, 0)
    assert len(loader) == len(batches) == 6 and len(batches[-1][1]) == 1
    assert np.array_equal(np.concatenate([labels for _, labels in batches]), [label for _, label in small_set.samples])
    assert np.array_equal(batches[-1][0][0], eval_transform(small_set.samples[-1][0], 16))
    assert_same_batches(batches, all_batches(loader, 5))  # eval does not depend on the epoch


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_files_are_skipped_and_reported_once(small_set, capsys, workers):
    garbage, truncated = small_set.samples[2][0], small_set.samples[11][0]
    with open(garbage, "wb") as file:
        file.write(b"this is not an image at all")
    assert truncated.endswith(".jpg")
    with open(truncated, "rb+") as file:
        file.truncate(len(file.read()) * 2 // 3)

    with Loader(small_set, 4, train=False, img_size=16, workers=workers) as loader:
        sizes = [len(labels) for _, labels in loader.epoch(0)]
        sizes_again = [len(labels) for _, labels in loader.epoch(1)]

    assert sizes == sizes_again == [3, 4, 3, 4, 4, 1]
    assert loader.skipped == [garbage, truncated]
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 2
    assert warnings[0].startswith(f"warning: skipping unreadable image {garbage} (")


@pytest.mark.parametrize("workers", [0, 2])
def test_batch_where_every_file_fails_raises(small_set, workers):
    for path, _ in small_set.samples[:2]:
        with open(path, "wb") as file:
            file.write(b"broken")
    loader = Loader(small_set, 2, train=False, img_size=16, workers=workers)
    with pytest.raises(DataError, match=r"every image of a batch failed.*img0.*img1"):
        next(loader.epoch(0))
    assert loader.pool is None  # the error stopped the workers


def test_batch_size_larger_than_training_set(small_set):
    with pytest.raises(DataError, match=r"--batch-size 22 is larger than the training set \(21 images"):
        Loader(small_set, 22, train=True, img_size=16)
    assert len(Loader(small_set, 22, train=False, img_size=16)) == 1  # fine for evaluation


def test_consumer_stopping_early_stops_the_workers(small_set):
    loader = Loader(small_set, 2, train=True, img_size=16, workers=2)
    for _ in loader.epoch(0):
        break
    assert loader.pool is None and multiprocessing.active_children() == []
    assert len(all_batches(loader, 0)) == 10  # a new epoch starts new workers
    loader.close()
    assert multiprocessing.active_children() == []


# ---------------------------------------------------------------- the synthetic dataset

def test_shapes_dataset_is_deterministic_and_loads_as_image_folder(tmp_path):
    synthetic.generate_shapes_dataset(tmp_path / "a", train_per_class=3, val_per_class=1, seed=0)
    synthetic.generate_shapes_dataset(tmp_path / "b", train_per_class=3, val_per_class=1, seed=0)
    train, val = load_datasets(tmp_path / "a")
    assert train.classes == list(synthetic.SHAPES_CLASSES) and len(train) == 30 and len(val) == 10
    images_a = [load_rgb(path) for path, _ in train.samples]
    images_b = [load_rgb(path.replace(str(tmp_path / "a"), str(tmp_path / "b"))) for path, _ in train.samples]
    assert all(np.array_equal(a, b) for a, b in zip(images_a, images_b))
    assert images_a[0].shape == (3, 32, 32)
    assert all(image.std() > 10 for image in images_a)
    assert len({image.tobytes() for image in images_a}) == 30


def test_ensure_shapes_dataset_uses_xdg_cache_once(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    folder = synthetic.ensure_shapes_dataset(train_per_class=1, val_per_class=1)
    assert folder.parent == tmp_path / "minimlp"
    assert sorted(path.name for path in folder.parent.iterdir()) == [folder.name]  # no partial folder left
    assert len(load_train(folder)) == 10

    def must_not_run(*args):
        raise AssertionError("generated again")
    monkeypatch.setattr(synthetic, "generate_shapes_dataset", must_not_run)
    assert synthetic.ensure_shapes_dataset(train_per_class=1, val_per_class=1) == folder


def test_interrupted_generation_leaves_no_dataset(tmp_path, monkeypatch):
    original_draw = synthetic.draw_image
    calls = []

    def draw_then_interrupt(class_name, rng):
        calls.append(class_name)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return original_draw(class_name, rng)

    monkeypatch.setattr(synthetic, "draw_image", draw_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        synthetic.ensure_shapes_dataset(tmp_path, train_per_class=1, val_per_class=1)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(synthetic, "draw_image", original_draw)
    assert len(load_train(synthetic.ensure_shapes_dataset(tmp_path, train_per_class=1, val_per_class=1))) == 10

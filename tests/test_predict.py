"""predict.py end to end, on a small model saved in the test as train.py saves it: its probabilities equal
the model's own softmax on the eval-transformed image, class names come from the checkpoint or a file,
and every bad input is one line and exit status 2."""
import json

import numpy as np
import pytest
from safetensors.numpy import save_file

import predict
from minimlp import create_model
from minimlp.backend import to_numpy
from minimlp.training.checkpoint import save_checkpoint
from minimlp.data.device_feed import IMAGENET_MEAN, IMAGENET_STD
from minimlp.data.transforms import eval_transform
from minimlp.weights import official_to_timm
from tests.imagetools import DEFAULT_EXTENSION, save_image

CLASSES = ["circle", "ring", "square", "triangle"]
CROP_PCT = 0.8  # not the default 0.875: the checkpoint's setting must be the one used
MODES = ["RGB", "L", "CMYK", "P", "RGBA", "LA", "I;16"]


def small_model(device="cpu"):
    """resmlp_tiny with 4 classes and weights far from their initialization (a near-uniform softmax would
    hide a wrong class order or transform)."""
    model = create_model("resmlp_tiny", num_classes=len(CLASSES), img_size=32, device=device, seed=3)
    rng = np.random.default_rng(7)
    state = {name: value + rng.normal(0, 0.05, value.shape) for name, value in model.state_dict().items()}
    state["head.weight"] = rng.normal(0, 1.0, state["head.weight"].shape)
    model.load_state_dict(state)
    return model


def save_training_checkpoint(path, model, classes=CLASSES, crop_pct=CROP_PCT):
    """As trainer.Trainer.save writes it: weights, optimizer state, meta with classes, model config, settings."""
    meta = dict(position=dict(epoch=3, batch=0, global_step=30), classes=list(classes), model=model.config,
                settings=dict(model="resmlp_tiny", img_size=32, crop_pct=crop_pct, batch_size=16, seed=0))
    save_checkpoint(path, model.state_dict(), {"step": np.array(30)}, meta)
    return path


def images_of_every_mode(folder):
    return [save_image(folder / f"{mode.replace(';', '')}{DEFAULT_EXTENSION[mode]}", size=(30 + 7 * index, 44),
                       mode=mode, seed=index) for index, mode in enumerate(MODES)]


def reference_probabilities(model, path, img_size=32, crop_pct=CROP_PCT):
    """softmax(model.forward(image)) for one image, normalized here in float64, not by predict's code."""
    image = eval_transform(path, img_size, crop_pct).astype(np.float64) / 255
    image = (image - np.array(IMAGENET_MEAN)[:, None, None]) / np.array(IMAGENET_STD)[:, None, None]
    logits = to_numpy(model.forward(image[None].astype(np.float32))).astype(np.float64)[0]
    exponentials = np.exp(logits - logits.max())
    return exponentials / exponentials.sum()


def run_predict(capsys, *args):
    status = predict.main([str(arg) for arg in args])
    out, err = capsys.readouterr()
    return status, out, err


def json_results(out):
    return [json.loads(line) for line in out.splitlines()]


def test_probabilities_are_the_models_softmax_on_the_checkpoints_eval_transform(tmp_path, capsys, device):
    model = small_model(device)
    weights = save_training_checkpoint(tmp_path / "best.npz", model)
    paths = images_of_every_mode(tmp_path / "images")
    status, out, err = run_predict(capsys, *paths, "--weights", weights, "--json", "--top", 3, "--device", device,
                                   "--batch-size", 3)
    assert status == 0, err
    results = json_results(out)
    assert [result["image"] for result in results] == [str(path) for path in paths]
    sensitive = False
    for path, result in zip(paths, results):
        expected = reference_probabilities(model, path)
        ranked = np.argsort(-expected)[:3]
        assert [entry["index"] for entry in result["top"]] == ranked.tolist()
        assert [entry["class"] for entry in result["top"]] == [CLASSES[index] for index in ranked]
        np.testing.assert_allclose([entry["probability"] for entry in result["top"]], expected[ranked],
                                   atol=2e-6 if device == "cpu" else 1e-4)  # batches of 3 vs 1; GPU: maybe TF32
        sensitive |= not np.allclose(expected, reference_probabilities(model, path, crop_pct=0.875), atol=1e-4)
    assert sensitive, "these images cannot tell crop_pct 0.8 from 0.875: the test would not see a wrong transform"
    assert "crop_pct 0.8" in err and "center crop 32 px" in err


def test_text_output_lists_the_top_classes_with_percentages(tmp_path, capsys):
    model = small_model()
    weights = save_training_checkpoint(tmp_path / "best.npz", model)
    image = save_image(tmp_path / "photo.jpg", size=(50, 40))
    status, out, _ = run_predict(capsys, image, "--weights", weights)
    assert status == 0
    lines = out.splitlines()
    expected = reference_probabilities(model, image)
    assert lines[0] == str(image)
    assert len(lines) == 1 + len(CLASSES)  # --top 5, but the model has 4 classes
    for line, index in zip(lines[1:], np.argsort(-expected)):
        assert line.split() == [f"{100 * expected[index]:.2f}%", CLASSES[index]]


def test_a_folder_is_searched_recursively_in_sorted_order(tmp_path, capsys):
    weights = save_training_checkpoint(tmp_path / "best.npz", small_model())
    folder = tmp_path / "photos"
    for name in ["b/z.png", "a.jpg", "b/a/x.webp", "c.PNG"]:
        save_image(folder / name)
    (folder / "notes.txt").write_text("not an image")
    save_image(folder / ".hidden.jpg")
    status, out, _ = run_predict(capsys, folder, "--weights", weights, "--json", "--top", 1)
    assert status == 0
    assert [result["image"] for result in json_results(out)] == [
        str(folder / name) for name in ["a.jpg", "b/a/x.webp", "b/z.png", "c.PNG"]]


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_published_weights_take_their_model_from_the_shapes_and_names_from_a_synset_file(tmp_path, capsys,
                                                                                          suffix):
    model = small_model()
    weights = tmp_path / f"resmlp_tiny{suffix}"
    state = official_to_timm(model.state_dict())  # timm's names and shapes, as published on the hub
    if suffix == ".npz":
        np.savez(weights, **state)
    else:
        save_file({name: np.ascontiguousarray(value) for name, value in state.items()}, str(weights))
    names = tmp_path / "LOC_synset_mapping.txt"
    names.write_text("n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\n"
                     "n01484850 great white shark\nn01491361 tiger shark, Galeocerdo cuvieri\n")
    labels = ["tench, Tinca tinca", "goldfish, Carassius auratus", "great white shark", "tiger shark, Galeocerdo cuvieri"]
    image = save_image(tmp_path / "fish.png", size=(60, 45), mode="RGBA")
    status, out, err = run_predict(capsys, image, "--weights", weights, "--class-names", names, "--json")
    assert status == 0, err
    expected = reference_probabilities(model, image, crop_pct=0.875)  # published weights: DeiT's default
    top = json_results(out)[0]["top"]
    assert [entry["class"] for entry in top] == [labels[index] for index in np.argsort(-expected)]
    np.testing.assert_allclose([entry["probability"] for entry in top], np.sort(expected)[::-1], atol=2e-6)
    assert "resmlp_tiny (dim 128, depth 6, patch 4, 32 px, 4 classes)" in err


def test_weights_without_class_names_show_class_numbers(tmp_path, capsys):
    weights = tmp_path / "weights.npz"
    np.savez(weights, **small_model().state_dict())
    status, out, err = run_predict(capsys, save_image(tmp_path / "a.jpg"), "--weights", weights, "--json")
    assert status == 0
    assert sorted(entry["class"] for entry in json_results(out)[0]["top"]) == [f"class {i}" for i in range(4)]
    assert "--class-names" in err


def test_a_checkpoints_wnid_classes_are_named_through_the_synset_file_in_any_order(tmp_path, capsys):
    wnids = ["n01443537", "n01440764", "n01491361", "n01484850"]
    weights = save_training_checkpoint(tmp_path / "best.npz", small_model(), classes=wnids)
    names = tmp_path / "LOC_synset_mapping.txt"
    names.write_text("n01440764 tench\nn01443537 goldfish\nn01484850 great white shark\nn01491361 tiger shark\n"
                     "n01494475 hammerhead\n")  # more classes than the checkpoint's, in another order
    status, out, _ = run_predict(capsys, save_image(tmp_path / "a.jpg"), "--weights", weights, "--class-names",
                                 names, "--json")
    assert status == 0
    by_index = {entry["index"]: entry["class"] for entry in json_results(out)[0]["top"]}
    assert by_index == {0: "goldfish", 1: "tench", 2: "tiger shark", 3: "great white shark"}


def bad_inputs(tmp_path):
    """name -> (arguments after the image, the image, what the one error line must name)."""
    model = small_model()
    checkpoint = save_training_checkpoint(tmp_path / "best.npz", model)
    image = save_image(tmp_path / "a.jpg")
    (tmp_path / "empty").mkdir()
    three_names = tmp_path / "names.txt"
    three_names.write_text("tench\ngoldfish\nshark\n")
    broken_weights = tmp_path / "broken.npz"
    np.savez(broken_weights, **{name: value for name, value in model.state_dict().items() if name != "head.bias"})
    return {
        "missing image": ([tmp_path / "nope.jpg", "--weights", checkpoint], "nope.jpg"),
        "empty folder": ([tmp_path / "empty", "--weights", checkpoint], "empty"),
        "missing weights": ([image, "--weights", tmp_path / "nope.npz"], "nope.npz"),
        "weights of another model": ([image, "--weights", broken_weights, "--model", "resmlp_s12"], "broken.npz"),
        "weights with a missing entry": ([image, "--weights", broken_weights], "head.bias"),
        "checkpoint of another model": ([image, "--weights", checkpoint, "--model", "resmlp_s12"], "--model"),
        "another image size": ([image, "--weights", checkpoint, "--img-size", "64"], "--img-size"),
        "class names of another count": ([image, "--weights", checkpoint, "--class-names", three_names],
                                         "--class-names"),
        "missing class-name file": ([image, "--weights", checkpoint, "--class-names", tmp_path / "no.txt"], "no.txt"),
    }


@pytest.mark.parametrize("case", ["missing image", "empty folder", "missing weights", "weights of another model",
                                  "weights with a missing entry", "checkpoint of another model", "another image size",
                                  "class names of another count", "missing class-name file"])
def test_bad_input_is_one_line_naming_it_and_exit_status_2(tmp_path, capsys, case):
    arguments, named = bad_inputs(tmp_path)[case]
    status, out, err = run_predict(capsys, *arguments)
    assert status == 2
    assert out == ""
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and named in errors[0], err
    assert err.splitlines()[-1] == errors[0]


def test_running_out_of_gpu_memory_is_one_line_naming_the_batch_size(tmp_path, capsys, monkeypatch):
    # (without a GPU: MemoryError stands in for CuPy's OutOfMemoryError, raised by the forward pass)
    class OutOfMemory(MemoryError):
        pass

    def exhausted(model, images):
        raise OutOfMemory("out of memory allocating 1,073,741,824 bytes")

    monkeypatch.setattr(predict.backend, "out_of_memory_errors", lambda: (OutOfMemory,))
    monkeypatch.setattr(predict, "probabilities", exhausted)
    weights = save_training_checkpoint(tmp_path / "best.npz", small_model())
    status, out, err = run_predict(capsys, save_image(tmp_path / "a.jpg"), "--weights", weights, "--batch-size", "8")
    assert status == 2 and out == ""
    assert err.splitlines()[-1].startswith("error: the GPU ran out of memory with --batch-size 8")


def test_an_unreadable_image_is_named_and_the_others_still_classified(tmp_path, capsys):
    weights = save_training_checkpoint(tmp_path / "best.npz", small_model())
    good = save_image(tmp_path / "good.jpg")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    status, out, err = run_predict(capsys, broken, good, "--weights", weights, "--json")
    assert status == 2
    assert [result["image"] for result in json_results(out)] == [str(good)]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {broken}: not a readable image")


def test_one_image_is_counted_in_the_singular(tmp_path, capsys):
    weights = save_training_checkpoint(tmp_path / "best.npz", small_model())
    status, _, err = run_predict(capsys, save_image(tmp_path / "a.jpg"), "--weights", weights)
    assert status == 0 and err.splitlines()[0].endswith("; 1 image")


def test_a_folder_of_class_folders_ends_with_its_top_1_and_top_5(tmp_path, capsys):
    """An ImageFolder (val/<class>/*) whose classes are the checkpoint's: its images are labelled, and the hits of
    the model's own ranking (reference_probabilities) are counted; a folder of other names is not labelled."""
    classes = [f"class{index}" for index in range(8)]  # more than 5: top-5 can miss
    model = create_model("resmlp_tiny", num_classes=len(classes), img_size=32, seed=5)
    state = model.state_dict()
    state["head.weight"] = np.random.default_rng(2).normal(0, 1.0, state["head.weight"].shape)
    model.load_state_dict(state)
    weights = save_training_checkpoint(tmp_path / "best.npz", model, classes=classes)
    val = tmp_path / "val"
    paths = [save_image(val / classes[index % 8] / f"{index}.png", size=(36, 36), seed=index) for index in range(24)]
    (val / "unlabelled.png").write_bytes(save_image(tmp_path / "x.png").read_bytes())  # beside the class folders
    ranks = [int(np.sum(reference_probabilities(model, path) > reference_probabilities(model, path)[index % 8]))
             for index, path in enumerate(paths)]
    top1, top5 = 100 * np.mean([rank == 0 for rank in ranks]), 100 * np.mean([rank < 5 for rank in ranks])
    assert 0 < top1 < top5 < 100  # the counts tell hits from misses
    status, out, _ = run_predict(capsys, val, "--weights", weights)
    assert status == 0
    assert out.splitlines()[-1] == f"{val}: top-1 {top1:.2f}%  top-5 {top5:.2f}%  (24 images of 8 classes)"
    status, out, _ = run_predict(capsys, val, "--weights", weights, "--json", "--top", 1)
    assert json_results(out)[-1] == dict(folder=str(val), images=24, classes=8, top1=pytest.approx(top1),
                                         top5=pytest.approx(top5))
    other = tmp_path / "other"
    save_image(other / "dogs" / "a.png")
    status, out, _ = run_predict(capsys, other, "--weights", weights)
    assert status == 0 and "top-1" not in out

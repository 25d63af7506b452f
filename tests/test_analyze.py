"""Weight analysis: the measures on matrices whose answer is known, and the command end to end on a small
model saved as a train.py checkpoint and as timm-named .safetensors, including every error it reports."""
import csv
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from minimlp import create_model
from minimlp.tools.analysis import (convolution_likeness, measure_layers, patch_grid_side, self_weight_ratio,
                              shifted_row_correlation, sparsity)
from minimlp.tools.analyze import main
from minimlp.weights import official_to_timm

DEPTH = 3
SIDE = 8  # patch grid of the constructed matrices


def convolution_matrix(kernel, side):
    """A[p, q] = kernel[dy + 1, dx + 1] for q = p + (dy, dx) on a side x side grid, zero padding: a 3x3
    convolution written as the cross-patch matrix it would be."""
    A = np.zeros((side * side, side * side))
    for row in range(side):
        for column in range(side):
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    if 0 <= row + dy < side and 0 <= column + dx < side:
                        A[row * side + column, (row + dy) * side + column + dx] = kernel[dy + 1, dx + 1]
    return A


# ---------------------------------------------------------------------------------------------
# the measures
# ---------------------------------------------------------------------------------------------
def test_convolution_scores_one_and_random_scores_zero():
    rng = np.random.default_rng(0)
    A = convolution_matrix(rng.normal(size=(3, 3)), SIDE)
    assert shifted_row_correlation(A, (0, 1)) > 0.999
    assert shifted_row_correlation(A, (1, 0)) > 0.999
    assert convolution_likeness(A) > 0.99
    assert abs(convolution_likeness(rng.normal(size=(SIDE * SIDE, SIDE * SIDE)))) < 0.2


def test_shifted_row_correlation_sees_the_direction():
    """Each grid row of query patches has its own random pattern, shifted along that row with the query:
    consistent with the right neighbour, not with the one below."""
    rng = np.random.default_rng(1)
    A = np.zeros((SIDE * SIDE, SIDE * SIDE))
    for row in range(SIDE):
        pattern = rng.normal(size=SIDE * SIDE)
        A[row * SIDE:(row + 1) * SIDE] = np.stack([np.roll(pattern.reshape(SIDE, SIDE), c, axis=1).ravel()
                                                    for c in range(SIDE)])
    assert shifted_row_correlation(A, (0, 1)) > 0.99
    assert abs(shifted_row_correlation(A, (1, 0))) < 0.3


def test_self_weight_ratio():
    rng = np.random.default_rng(2)
    n = SIDE * SIDE
    assert self_weight_ratio(np.eye(n) + 0.01 * rng.normal(size=(n, n))) > 50
    assert self_weight_ratio(rng.normal(size=(n, n))) == pytest.approx(1.0, abs=0.2)


def test_sparsity_counts_entries_below_five_percent_of_the_largest():
    weight = np.array([[-10.0, 0.4, -0.49, 0.5],    # 0.5 = exactly 5% of 10: not below
                       [3.0, -0.01, 7.0, 0.0]])
    assert sparsity(weight) == 4 / 8               # 0.4, -0.49, -0.01, 0.0
    assert sparsity(weight, threshold=0.5) == 6 / 8  # also 3.0 (< 5.0), not 7.0
    assert sparsity(np.zeros((3, 3))) == 1.0


def test_patch_grid_side():
    assert patch_grid_side(196) == 14
    with pytest.raises(ValueError, match="12 patches do not form a square grid"):
        patch_grid_side(12)


def test_measure_layers_on_a_state_dict():
    rng = np.random.default_rng(3)
    n = SIDE * SIDE
    weights = {"blocks.0.attn.weight": convolution_matrix(rng.normal(size=(3, 3)), SIDE),
               "blocks.1.attn.weight": np.eye(n) + 0.01 * rng.normal(size=(n, n))}
    for layer in range(2):
        weights[f"blocks.{layer}.mlp.fc1.weight"] = rng.normal(size=(16, 4))
        weights[f"blocks.{layer}.mlp.fc2.weight"] = rng.normal(size=(4, 16))
    measures = measure_layers(weights)
    assert [m["layer"] for m in measures] == [0, 1]
    assert measures[0]["convolution"] > 0.99
    assert measures[1]["self_weight"] > 50
    assert measures[1]["B"] == sparsity(weights["blocks.1.mlp.fc1.weight"])


# ---------------------------------------------------------------------------------------------
# the command, end to end
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_model_weights():
    """16 patches (a 4x4 grid), 3 layers."""
    model = create_model("resmlp_tiny", num_classes=4, img_size=16, patch_size=4, depth=DEPTH, dim=16)
    return model.state_dict()


@pytest.fixture(scope="module")
def checkpoints(small_model_weights, tmp_path_factory):
    from safetensors.numpy import save_file
    folder = tmp_path_factory.mktemp("checkpoints")
    train_checkpoint = folder / "checkpoint.npz"
    np.savez(train_checkpoint, **{"model/" + name: value for name, value in small_model_weights.items()},
             **{"optimizer/step": np.array(7)})
    timm_weights = folder / "timm.safetensors"
    save_file(official_to_timm(small_model_weights), str(timm_weights))
    return {"train.py checkpoint": train_checkpoint, "timm safetensors": timm_weights}


@pytest.mark.parametrize("kind", ["train.py checkpoint", "timm safetensors"])
def test_command_writes_every_file(kind, checkpoints, small_model_weights, tmp_path, capsys):
    out = tmp_path / "analysis"
    assert main([str(checkpoints[kind]), "--out", str(out)]) == 0

    for layer in [0, 1, 2]:  # the default: first, middle, last
        with Image.open(out / f"cross_patch_layer_{layer}.png") as image:
            assert image.width > 300 and image.height > 300
    with Image.open(out / "sparsity.png") as image:
        assert image.width > 300 and image.height > 200

    with open(out / "sparsity.csv") as file:
        rows = list(csv.DictReader(file))
    assert [int(row["layer"]) for row in rows] == list(range(DEPTH))
    for row in rows:
        for label, name in [("A", "attn"), ("B", "mlp.fc1"), ("C", "mlp.fc2")]:
            expected = sparsity(small_model_weights[f"blocks.{row['layer']}.{name}.weight"])
            assert 0 <= float(row[label]) <= 1
            assert float(row[label]) == pytest.approx(expected, abs=1e-12)

    summary = (out / "summary.txt").read_text()
    assert "16 patches on a 4×4 grid" in summary
    table = summary.splitlines()[-DEPTH:]
    assert [int(line.split()[0]) for line in table] == list(range(DEPTH))
    assert summary in capsys.readouterr().out


def test_command_draws_the_chosen_layers(checkpoints, tmp_path):
    out = tmp_path / "analysis"
    assert main([str(checkpoints["train.py checkpoint"]), "--out", str(out), "--layers", "1"]) == 0
    assert sorted(path.name for path in out.glob("cross_patch_layer_*.png")) == ["cross_patch_layer_1.png"]


def test_command_line_entry_point(checkpoints, tmp_path):
    result = subprocess.run([sys.executable, "-m", "minimlp.tools.analyze", str(checkpoints["timm safetensors"]),
                             "--out", str(tmp_path), "--layers", "0,2"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "cross_patch_layer_2.png").is_file()


# ---------------------------------------------------------------------------------------------
# errors: one line on stderr, exit status 1, no traceback
# ---------------------------------------------------------------------------------------------
def write_npz(path, weights):
    np.savez(path, **weights)
    return path


def square_blocks(num_patches):
    rng = np.random.default_rng(4)
    return {"blocks.0.attn.weight": rng.normal(size=(num_patches, num_patches)),
            "blocks.0.mlp.fc1.weight": rng.normal(size=(8, 2)), "blocks.0.mlp.fc2.weight": rng.normal(size=(2, 8))}


ERROR_CASES = {
    "missing file": (lambda folder, cks: folder / "nowhere.npz", [], "no such weights file"),
    "unreadable file": (lambda folder, cks: _write_text(folder / "broken.npz"), [], "not a readable .npz"),
    "unknown format": (lambda folder, cks: _write_text(folder / "weights.pth"), [], "unknown weights format"),
    "no cross-patch matrix": (lambda folder, cks: write_npz(folder / "other.npz", {"head.weight": np.ones((2, 2))}),
                              [], "no cross-patch matrix"),
    "non-square patch count": (lambda folder, cks: write_npz(folder / "twelve.npz", square_blocks(12)),
                               [], "12 patches do not form a square grid"),
    "A not N x N": (lambda folder, cks: write_npz(folder / "wide.npz", {**square_blocks(4),
                                                                        "blocks.0.attn.weight": np.ones((4, 5))}),
                    [], "blocks.0.attn.weight has shape (4, 5)"),
    "missing fc1": (lambda folder, cks: write_npz(folder / "nofc1.npz", {
        name: value for name, value in square_blocks(4).items() if "fc1" not in name}),
        [], "blocks.0.mlp.fc1.weight is missing"),
    "layer out of range": (lambda folder, cks: cks["train.py checkpoint"], ["--layers", "0,3"],
                           "3 is out of range; this model has 3 layers, numbered 0 to 2"),
    "layer list not numbers": (lambda folder, cks: cks["train.py checkpoint"], ["--layers", "first"],
                               "expected comma-separated layer numbers"),
}


def _write_text(path):
    path.write_text("not weights")
    return path


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_errors_are_one_line(case, checkpoints, tmp_path, capsys):
    make_path, extra_args, message = ERROR_CASES[case]
    path = make_path(tmp_path, checkpoints)
    assert main([str(path), "--out", str(tmp_path / "out"), *extra_args]) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith("minimlp.tools.analyze: error: ")
    assert message in captured.err
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert not (tmp_path / "out").exists()  # nothing written for a failed run


def test_error_exit_status_from_the_command_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "minimlp.tools.analyze", str(tmp_path / "nowhere.npz"),
                             "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr

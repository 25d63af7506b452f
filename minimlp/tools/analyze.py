"""Draw and summarize what a ResMLP learned: the paper's weight figures from any checkpoint.

    python -m minimlp.tools.analyze CHECKPOINT --out DIR [--layers 0,5,11]

CHECKPOINT: a train.py checkpoint (.npz), or published weights in .npz or .safetensors with official or
timm names. --layers picks the blocks whose cross-patch matrix A is drawn (default: first, middle, last;
counted from 0 like blocks.i). Writes into DIR:
    cross_patch_layer_<i>.png   rows of A for a grid of query patches, each on the patch grid, placed at
                                its query patch's position (the paper's Figure 2)
    sparsity.png, sparsity.csv  sparsity of A, B (fc1) and C (fc2) for every layer (layer,A,B,C)
    summary.txt                 per layer: convolution likeness and self weight of A, sparsity (also printed)
The measures are defined in minimlp.tools.analysis; what the paper found is in docs/reference.md, Weight analysis.
"""
import csv
import sys
from pathlib import Path

import numpy as np
# Figures are built as matplotlib Figure objects and saved with its Agg renderer, without pyplot: importing
# this module (say, in a notebook lesson) leaves matplotlib's backend alone, and no figure stays open.
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from .analysis import MATRIX_NAMES, SPARSITY_THRESHOLD, block_count, measure_layers, patch_grid_side
from ..training.command_line import ArgumentParser
from ..weights import WeightsError, read_weights, timm_to_official

QUERY_GRID = 5  # query patches per side of a layer's figure; every patch when the grid is this small
COLOURS = {"A": "tab:red", "B": "tab:blue", "C": "tab:green"}


class AnalysisError(ValueError):
    """Something wrong with the command's input, said in one line."""


def load_official_weights(path):
    """{official name: array} from any weights file read_weights understands; AnalysisError if it has
    no blocks.i.attn.weight (then it is not a ResMLP)."""
    try:
        weights = timm_to_official(read_weights(path))
    except WeightsError as error:
        raise AnalysisError(str(error)) from None
    if block_count(weights) == 0:
        raise AnalysisError(f"{path}: no cross-patch matrix (blocks.<i>.attn.weight, or timm's "
                            "blocks.<i>.linear_tokens.weight) found; is this a ResMLP checkpoint?")
    return weights


def parse_layers(text, depth):
    """'0,5,11' -> [0, 5, 11]; None -> first, middle and last layer. AnalysisError for a bad list or an
    index outside 0..depth-1."""
    if text is None:
        return list(dict.fromkeys([0, (depth - 1) // 2, depth - 1]))
    try:
        layers = [int(part) for part in text.split(",")]
    except ValueError:
        raise AnalysisError(f"--layers {text!r}: expected comma-separated layer numbers, e.g. 0,5,11") from None
    outside = [layer for layer in layers if not 0 <= layer < depth]
    if outside:
        raise AnalysisError(f"--layers {text}: {outside[0]} is out of range; this model has {depth} layers, "
                            f"numbered 0 to {depth - 1}")
    return list(dict.fromkeys(layers))


def query_positions(side):
    """Evenly spaced patch rows (the same for columns) whose rows of A are drawn: all when side <= QUERY_GRID."""
    return np.unique(np.linspace(0, side - 1, min(side, QUERY_GRID)).round().astype(int))


def draw_cross_patch_rows(A, layer, path):
    """The paper's figure for one layer: row p of A reshaped to the patch grid, for a grid of query patches
    p, each small map placed where its query patch sits. Diverging colours centred on 0, limits +-max |A|."""
    side = patch_grid_side(A.shape[0])
    positions = query_positions(side)
    limit = float(np.abs(A).max()) or 1.0  # an all-zero A still gets a valid colour scale
    count = len(positions)
    figure = Figure(figsize=(1.5 * count + 1.5, 1.5 * count + 1.2), layout="constrained")
    axes = figure.subplots(count, count, squeeze=False)
    for i, query_row in enumerate(positions):
        for j, query_column in enumerate(positions):
            ax = axes[i, j]
            row = A[query_row * side + query_column].reshape(side, side)
            image = ax.imshow(row, cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
            ax.add_patch(Rectangle((query_column - 0.5, query_row - 0.5), 1, 1, fill=False, edgecolor="black",
                                   linewidth=0.8))
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(f"row {query_row}", fontsize=8)
            if i == count - 1:
                ax.set_xlabel(f"column {query_column}", fontsize=8)
    figure.colorbar(image, ax=axes, shrink=0.8, label="weight")
    figure.suptitle(f"Layer {layer} ({MATRIX_NAMES['A'].format(layer)}): rows of A on the {side}×{side} "
                    f"patch grid\nplaced by query patch (black box); colour scale ±{limit:.3g} = max |A| "
                    "of this layer", fontsize=9)
    figure.savefig(path, dpi=100)


def draw_sparsity(measures, path):
    """Layer on x, sparsity of A, B and C on y: the paper's sparsity plot."""
    layers = [m["layer"] for m in measures]
    figure = Figure(figsize=(6, 4), layout="constrained")
    ax = figure.subplots()
    for label, description in [("A", "A (cross-patch, attn)"), ("B", "B (mlp.fc1)"), ("C", "C (mlp.fc2)")]:
        ax.plot(layers, [m[label] for m in measures], marker="o", color=COLOURS[label], label=description)
    ax.set_xlabel("layer")
    ax.set_ylabel(f"fraction of |w| < {SPARSITY_THRESHOLD:.0%} of max |w|")
    ax.set_ylim(0, 1)
    ax.set_xticks(layers)
    ax.set_title("Sparsity of the learned matrices")
    ax.grid(alpha=0.3)
    ax.legend()
    figure.savefig(path, dpi=100)


def write_sparsity_csv(measures, path):
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["layer", "A", "B", "C"])
        for m in measures:
            writer.writerow([m["layer"], repr(m["A"]), repr(m["B"]), repr(m["C"])])


def summary_text(measures, source, side):
    lines = [f"ResMLP weights {source}: {len(measures)} layers, {side * side} patches on a {side}×{side} grid",
             "conv:     mean correlation of each row of A with its right / lower neighbour's row, shifted one",
             "          patch (1 = a convolution on the patch grid, ~0 = random; a diagonal spike, a 1x1",
             "          convolution, also scores high: read it with self)",
             "self:     mean |A[p,p]| / mean |A[p,q]|, q != p (~1 = no spike at the patch itself)",
             f"A, B, C:  sparsity, the fraction of entries with |w| < {SPARSITY_THRESHOLD:.0%} of the matrix's "
             "max |w|",
             "          (A = attn, B = mlp.fc1, C = mlp.fc2)",
             "",
             f"{'layer':>5}  {'conv':>6}  {'self':>7}  {'A':>5}  {'B':>5}  {'C':>5}"]
    for m in measures:
        lines.append(f"{m['layer']:>5}  {m['convolution']:>6.3f}  {m['self_weight']:>7.2f}  "
                     f"{m['A']:>5.3f}  {m['B']:>5.3f}  {m['C']:>5.3f}")
    return "\n".join(lines) + "\n"


def analyze(checkpoint, out_dir, layers=None):
    """Write every figure, the CSV and the summary into out_dir; return the summary text.
    layers: a string like '0,5,11' or None for first, middle and last."""
    weights = load_official_weights(checkpoint)
    try:
        measures = measure_layers(weights)
    except (KeyError, ValueError) as error:
        raise AnalysisError(f"{checkpoint}: {error.args[0]}") from None
    chosen = parse_layers(layers, len(measures))
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise AnalysisError(f"--out {out_dir}: cannot create the folder ({error.strerror})") from None

    for layer in chosen:
        A = np.asarray(weights[MATRIX_NAMES["A"].format(layer)], dtype=np.float64)
        draw_cross_patch_rows(A, layer, out_dir / f"cross_patch_layer_{layer}.png")
    draw_sparsity(measures, out_dir / "sparsity.png")
    write_sparsity_csv(measures, out_dir / "sparsity.csv")
    side = patch_grid_side(weights[MATRIX_NAMES["A"].format(0)].shape[0])
    summary = summary_text(measures, checkpoint, side)
    (out_dir / "summary.txt").write_text(summary)
    return summary


def main(argv=None):
    """The command line; returns the exit status (0, or 1 after a one-line error on stderr)."""
    parser = ArgumentParser(prog="python -m minimlp.tools.analyze",
                            description="Draw the cross-patch matrices of a ResMLP checkpoint and measure how "
                                        "convolution-like and how sparse its weights are.")
    parser.add_argument("checkpoint", help="train.py checkpoint (.npz) or published weights (.npz, .safetensors)")
    parser.add_argument("--out", required=True, help="folder for the figures, sparsity.csv and summary.txt")
    parser.add_argument("--layers", help="layers whose rows of A are drawn, e.g. 0,5,11 (default: first, "
                                         "middle, last)")
    args = parser.parse_args(argv)
    try:
        summary = analyze(args.checkpoint, args.out, args.layers)
    except AnalysisError as error:
        print(f"minimlp.tools.analyze: error: {error}", file=sys.stderr)
        return 1
    print(summary, end="")
    print(f"figures, sparsity.csv and summary.txt written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

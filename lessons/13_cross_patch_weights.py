# %% [markdown]
# # Lesson 13: what the trained cross-patch matrices look like
#
# Lesson 5 showed that an N x N matrix A CAN act like a convolution on the patch grid (every row the
# same small pattern, shifted to sit on its own patch). Nobody tells ResMLP to do that; the paper
# finds that after training on ImageNet, the A's of early layers look like convolutions anyway, later
# layers show a spike at the patch itself plus a diffuse response, and A is sparser than the MLP's
# matrices B = fc1 and C = fc2.
#
# minimlp.tools.analysis turns those observations into numbers, and minimlp.tools.analyze draws the paper's
# figure. This lesson opens both, checks the measures on matrices whose answer we know (a
# convolution, a random matrix), and applies them to the model trained in lesson 11, before and
# after training. It reads lessons/out/11_shapes_resmlp.npz, and runs lesson 11 first if that file
# is missing (~10 s). Pictures: lessons/out/13_*.png.
#
# Run: python lessons/13_cross_patch_weights.py

# %%
# _lesson first: it puts the repository on the import path and sets BLAS threads before numpy loads
from _lesson import REPO_ROOT, check, heading, output_dir, show_picture, show_source

import subprocess
import sys

import numpy as np

from minimlp import create_model
from minimlp.tools import analysis, analyze


# %% [markdown]
# ## 1. The measures, on matrices whose answer we know

# %%
heading("1. The measures, on matrices whose answer we know")
show_source(analysis.sparsity)
show_source(analysis.shifted_row_correlation)
# Read it: on the grid, row p of a convolution is kernel[m - p]; the row of the neighbour q = p + shift
# is the same kernel moved by one patch. Compare row p with row q read one shift further on: for a
# convolution they are equal (correlation 1); for a random A unrelated (~0).
side = 6
blur = np.zeros((side * side, side * side))  # each patch: itself 0.5, its 4 neighbours 0.125 each
for row in range(side):
    for col in range(side):
        blur[row * side + col, row * side + col] = 0.5
        for d_row, d_col in ((0, 1), (0, -1), (1, 0), (-1, 0)):
            if 0 <= row + d_row < side and 0 <= col + d_col < side:
                blur[row * side + col, (row + d_row) * side + col + d_col] = 0.125
random_A = np.random.default_rng(0).normal(size=(side * side, side * side))
for name, matrix in [("3x3 blur (a convolution)", blur), ("random", random_A), ("identity", np.eye(side * side))]:
    print(f"  {name:25s} convolution {analysis.convolution_likeness(matrix):+.2f}   self weight "
          f"{analysis.self_weight_ratio(matrix):8.2f}   sparsity {analysis.sparsity(matrix):.2f}")
check(analysis.convolution_likeness(blur) > 0.99 and abs(analysis.convolution_likeness(random_A)) < 0.2,
      "convolution_likeness is ~1 for a convolution and ~0 for a random matrix")
check(analysis.sparsity(random_A) == np.mean(np.abs(random_A) < 0.05 * np.abs(random_A).max()),
      "sparsity is the paper's: the fraction of |w| below 5% of the largest |w|")
# Note the identity: a 1x1 convolution scores high too, which is why self_weight is reported beside it.


# %% [markdown]
# ## 2. The model of lesson 11, trained and at initialization

# %%
heading("2. The model of lesson 11, trained and at initialization")
weights_path = output_dir() / "11_shapes_resmlp.npz"
if not weights_path.exists():
    print(f"{weights_path} not found: running lesson 11 to train it (its output is not shown)")
    subprocess.run([sys.executable, str(REPO_ROOT / "lessons" / "11_training_loop.py")], cwd=REPO_ROOT,
                   check=True, stdout=subprocess.DEVNULL)
trained = analyze.load_official_weights(weights_path)  # any .npz/.safetensors, official or timm names
# The same architecture and seed as lesson 11, untrained: what the measures say about random init.
initial = create_model("resmlp_tiny", dim=64, depth=2, patch_size=8, seed=0).state_dict()
show_source(analysis.measure_layers)
trained_measures, initial_measures = analysis.measure_layers(trained), analysis.measure_layers(initial)
print(f"{'layer':>5} {'':9s} {'conv':>6} {'self':>6} {'A':>6} {'B':>6} {'C':>6}   (A, B, C: sparsity)")
for before, after in zip(initial_measures, trained_measures):
    for label, m in (("init", before), ("trained", after)):
        print(f"{m['layer']:>5} {label:9s} {m['convolution']:+6.2f} {m['self_weight']:6.2f} {m['A']:6.3f} {m['B']:6.3f} {m['C']:6.3f}")


# %% [markdown]
# ## 3. The paper's figure

# %%
heading("3. The paper's figure")
show_source(analyze.draw_cross_patch_rows, max_lines=12)
for layer in range(len(trained_measures)):
    A = trained[analysis.MATRIX_NAMES["A"].format(layer)].astype(np.float64)
    path = output_dir() / f"13_cross_patch_layer_{layer}.png"
    analyze.draw_cross_patch_rows(A, layer, path)
    show_picture(path)
path = output_dir() / "13_cross_patch_layer_0_at_init.png"
analyze.draw_cross_patch_rows(initial["blocks.0.attn.weight"], 0, path)
show_picture(path, "(the same layer before training, for comparison)")
path = output_dir() / "13_sparsity.png"
analyze.draw_sparsity(trained_measures, path)
show_picture(path)

# What to notice in the pictures and the table:
#  - The trained rows are mostly negative: every patch subtracts a share of the others (a kind of
#    "minus the surround", removing what all patches have in common, such as the background). The
#    four inner patches keep a positive weight on themselves (the black box); on average a patch
#    weighs itself above the others. The rows resemble shifted copies of each other more than at
#    initialization, which is what `conv` measures: it rises from its random level.
#  - Our grid is only 4x4 (16 patches of 8x8 pixels), so "local support" has little room to show,
#    and 500 steps on 1,000 images are not ImageNet's 400 epochs: unlike the paper, A is NOT sparser
#    than B and C here. The measures report what this model learned, not what we hoped to see.
# For the real thing: python -m minimlp.tools.analyze on published ResMLP weights (see analyze's docstring).


# %% [markdown]
# ## 4. Check: training made A more convolution-like

# %%
heading("4. Check: training made A more convolution-like")
for before, after in zip(initial_measures, trained_measures):
    check(after["convolution"] > before["convolution"] + 0.1,
          f"layer {after['layer']}: convolution likeness rose from {before['convolution']:+.2f} to {after['convolution']:+.2f}")
first_A = trained["blocks.0.attn.weight"]
diagonal_minus_rest = np.mean(np.diagonal(first_A)) - np.mean(first_A[~np.eye(len(first_A), dtype=bool)])
check(diagonal_minus_rest > 0, f"in layer 0 a patch weighs itself above the others (by {diagonal_minus_rest:.2f} on average)")


# %% [markdown]
# ## Exercises (hints after the arrow)
#
# 1. Train lesson 11 with patch_size=4 (an 8x8 grid, N = 64; ~4x slower) and re-run this lesson.
#    -> with room on the grid, the rows of layer 0 can show local support around their patch.
# 2. Turn off weight decay in lesson 11 (WEIGHT_DECAY = 0) and compare the sparsity of A, B, C.
#    -> weight decay is one force that pushes unused weights towards 0, i.e. makes them sparse.
# 3. Replace layer 0's A by the blur matrix of section 1 (6x6 won't fit: build it for side 4) and
#    measure lesson 11's validation accuracy without retraining. -> it drops: the other layers were
#    trained together with the learned A, not with a blur.
# 4. Download official ResMLP-S12 weights (deit's resmlp_12_no_dist.pth, converted to .npz with
#    torch.load and numpy.savez) and run python -m minimlp.tools.analyze on them. -> early layers show
#    the convolution-like rows of the paper's Figure 3; A is much sparser than B and C.

# %%
print("\nLesson 13 done: the cross-patch matrices learn shared, translation-equivariant patterns.")

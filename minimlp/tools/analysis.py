"""What ResMLP's weights learn, as numbers (pure NumPy; minimlp.tools.analyze draws them).

The paper (Touvron et al. 2021, section 3.3; docs/reference.md, Weight analysis) reads three matrices
of each block i:
    A = blocks.i.attn.weight     (N, N)   cross-patch mixing: out[p] = sum_q A[p, q] * in[q]
    B = blocks.i.mlp.fc1.weight  (4d, d)  channel MLP, first layer
    C = blocks.i.mlp.fc2.weight  (d, 4d)  channel MLP, second layer
Row p of A holds the weights with which patch p gathers every patch q. Seen on the patch grid
(N = side * side patches), early rows look like one small local pattern shifted to sit on p, i.e. a
convolution; later rows show a spike at p itself plus a diffuse response. A is also sparser than B and C.

    sparsity(weight)                fraction of entries with |w| < 5% of max |w|
    convolution_likeness(A)         ~1 for a convolution on the patch grid, ~0 for a random A
    self_weight_ratio(A)            mean |A[p, p]| / mean |A[p, q]|, q != p: the diagonal spike
    measure_layers(state_dict)      all of the above for every block, from official weight names
"""
import math
import re

import numpy as np

SPARSITY_THRESHOLD = 0.05  # the paper's: an entry is "small" below 5% of its matrix's largest |w|

# the paper's A, B, C for block i, by official name
MATRIX_NAMES = {"A": "blocks.{}.attn.weight", "B": "blocks.{}.mlp.fc1.weight", "C": "blocks.{}.mlp.fc2.weight"}


def sparsity(weight, threshold=SPARSITY_THRESHOLD):
    """Fraction of entries with |w| < threshold * max |w| (the paper's measure, threshold 5%).
    An all-zero matrix is fully sparse (1.0)."""
    magnitude = np.abs(np.asarray(weight, dtype=np.float64))
    largest = magnitude.max()
    if largest == 0:
        return 1.0
    return float(np.mean(magnitude < threshold * largest))


def patch_grid_side(num_patches):
    """side with side * side == num_patches; ValueError when the patches cannot form a square grid."""
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"{num_patches} patches do not form a square grid, so the rows of A cannot be "
                         "laid out on it (ResMLP cuts square images into square grids of patches)")
    return side


def shifted_row_correlation(A, shift):
    """Mean over query patches p of the correlation between row p and row q = p + shift, with row q read
    one shift further on: A[p, m] against A[q, m + shift] over all key patches m where both lie on the grid.

    shift = (rows, columns) on the patch grid, e.g. (0, 1) = right neighbour, (1, 0) = the one below.
    A convolution gives A[p, m] = kernel[m - p] for every p, so A[q, m + shift] = kernel[m - p] = A[p, m]
    and the correlation is 1 (zero padding included); for a random A it is ~0. Pairs where either
    row is constant (no correlation defined) are left out; nan if every pair is."""
    A = np.asarray(A, dtype=np.float64)
    side = patch_grid_side(A.shape[0])
    dy, dx = shift
    # on_grid[query row, query column, key row, key column]
    on_grid = A.reshape(side, side, side, side)
    rows_p = on_grid[:side - dy, :side - dx, :side - dy, :side - dx]
    rows_q = on_grid[dy:, dx:, dy:, dx:]
    pairs = rows_p.shape[0] * rows_p.shape[1]
    rows_p = rows_p.reshape(pairs, -1) - rows_p.reshape(pairs, -1).mean(axis=1, keepdims=True)
    rows_q = rows_q.reshape(pairs, -1) - rows_q.reshape(pairs, -1).mean(axis=1, keepdims=True)
    norms = np.linalg.norm(rows_p, axis=1) * np.linalg.norm(rows_q, axis=1)
    defined = norms > 0
    if not defined.any():
        return float("nan")
    return float(np.mean(np.sum(rows_p * rows_q, axis=1)[defined] / norms[defined]))


def convolution_likeness(A):
    """How much A acts like a convolution on the patch grid: the mean of shifted_row_correlation for the
    right neighbour (0, 1) and the one below (1, 0). 1 = a convolution (every row is the same local
    pattern, shifted to its patch: a translation-equivariant, Toeplitz-like A); ~0 = a random matrix.
    The identity is a convolution too (a 1x1 kernel): a strong diagonal spike alone also scores high, so
    read it together with self_weight_ratio."""
    return float(np.mean([shifted_row_correlation(A, (0, 1)), shifted_row_correlation(A, (1, 0))]))


def self_weight_ratio(A):
    """mean |A[p, p]| / mean |A[p, q]| over q != p: how much more a patch takes from itself than from
    any other patch. ~1 for a random A; large when rows spike at their own patch (later layers)."""
    magnitude = np.abs(np.asarray(A, dtype=np.float64))
    diagonal = np.diagonal(magnitude).mean()
    off_diagonal = (magnitude.sum() - np.trace(magnitude)) / (magnitude.size - magnitude.shape[0])
    with np.errstate(divide="ignore", invalid="ignore"):  # A diagonal: inf; A zero: nan
        return float(diagonal / off_diagonal)


def block_count(state_dict):
    """Number of blocks, from the highest i with a blocks.i.attn.weight (official names); 0 if none."""
    indices = [int(match.group(1)) for name in state_dict
               if (match := re.fullmatch(r"blocks\.(\d+)\.attn\.weight", name))]
    return max(indices) + 1 if indices else 0


def layer_matrices(state_dict, layer):
    """{"A", "B", "C": that block's matrix} from official names; KeyError naming a missing one."""
    matrices = {}
    for label, pattern in MATRIX_NAMES.items():
        name = pattern.format(layer)
        if name not in state_dict:
            raise KeyError(f"{name} is missing")
        matrices[label] = np.asarray(state_dict[name])
    return matrices


def measure_layers(state_dict):
    """One dict per block (official names): layer, convolution (convolution_likeness of A), self_weight
    (self_weight_ratio of A) and the sparsity of A, B and C. KeyError for a missing matrix, ValueError
    for an A that is not (N, N) with N a square."""
    measures = []
    for layer in range(block_count(state_dict)):
        matrices = layer_matrices(state_dict, layer)
        A = matrices["A"]
        if A.ndim != 2 or A.shape[0] != A.shape[1]:
            raise ValueError(f"{MATRIX_NAMES['A'].format(layer)} has shape {A.shape}; a cross-patch matrix "
                             "is (N, N)")
        patch_grid_side(A.shape[0])
        measures.append({"layer": layer, "convolution": convolution_likeness(A), "self_weight": self_weight_ratio(A),
                         **{label: sparsity(matrix) for label, matrix in matrices.items()}})
    return measures

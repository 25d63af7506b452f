"""A checkpoint written before the package moved into sub-packages still loads and continues exactly.

The two files in tests/data/ were written by the flat layout (tests/data/README.md has the script and the
commit): a run with every optional part (loss scaler, moving average of the weights), and the parameters,
average, loss and loss scale that one more step from it gave there. Today's code must give the same, bit for bit.
"""
from pathlib import Path

import numpy as np

from minimlp.model import ResMLP
from minimlp.ops import REFERENCE_OPERATIONS
from minimlp.optim import AdamW
from minimlp.precision import policy
from minimlp.step import train_step
from minimlp.training.checkpoint import read_resume, restore_run
from minimlp.training.ema import ModelEma

DATA = Path(__file__).parent / "data"


def test_a_checkpoint_of_the_flat_layout_resumes_bit_for_bit():
    path = DATA / "old_layout_checkpoint.npz"
    expected = np.load(DATA / "old_layout_next_step.npz")
    checkpoint = read_resume(path)
    meta = checkpoint[2]
    config = {key: meta["model"][key] for key in ("num_classes", "img_size", "patch_size", "dim", "depth",
                                                 "layerscale_init", "drop_path")}
    model = ResMLP(**config, seed=1, ops=REFERENCE_OPERATIONS)  # another seed: every value must come from the file
    optimizer = AdamW(model.parameters, model.ops, lr=1e-3, weight_decay=0.05)
    precision, ema = policy("float16"), ModelEma(model.parameters.data, decay=0.9)  # the run had --amp
    position = restore_run(path, checkpoint, model, optimizer, precision, 0.05, ema=ema)
    assert position["global_step"] == 2 and meta["classes"] == ["a", "b", "c"]
    loss, finite = train_step(model, optimizer, expected["images"], expected["labels"], lr=1e-3, precision=precision,
                              smoothing=0.1)
    ema.update(model.parameters.data)
    assert finite
    assert float(loss) == float(expected["loss"])
    np.testing.assert_array_equal(model.parameters.data, expected["parameters"])
    np.testing.assert_array_equal(ema.data, expected["ema"])
    assert precision.loss_scaler.scale == float(expected["loss_scale"])

"""Evaluation: the mean loss and the top-1/top-5 accuracy of a model over a loader's batches."""
import numpy as np

from .. import backend
from ..data.device_feed import DeviceFeed
from ..layers import CrossEntropy
from ..parallel.distributed import SingleProcess
from ..precision import autocast
from .progress import track


def topk_correct(logits, labels, ks=(1, 5)):
    """How many rows have their label among the k largest logits, for each k: a (len(ks),) array on the
    logits' device."""
    xp = backend.get_xp(logits)
    ranked = xp.argsort(-logits, axis=1)[:, :max(ks)]
    hits = ranked == labels[:, None]
    return xp.stack([hits[:, :k].any(axis=1).sum() for k in ks])


def evaluate(model, loader, feed=None, matmul_dtype=None, desc="eval", world=SingleProcess()):
    """Mean loss (no label smoothing) and top-1/top-5 in percent over every batch of `loader`.
    matmul_dtype: the matrix products' operand dtype, as in training (minimlp.precision: Precision.matmul_dtype).
    The sums stay on the device until the end, so the host never waits for the GPU between batches. world (data
    parallel): each rank's loader holds its shard of the validation set, and the sums are added up over the ranks."""
    feed = feed or DeviceFeed(model.device, model.dtype)
    totals = model.xp.zeros(3, dtype=np.float64)  # loss sum, top-1 hits, top-5 hits
    count = 0
    criterion = CrossEntropy(model.ops)  # no label smoothing
    for x, y in track(feed.batches(loader.epoch(0)), len(loader), desc, unit="batch", every=0):
        with autocast(matmul_dtype):
            logits = model.forward(x)
        loss, _ = criterion(logits, y)  # the training step's loss code, through the model's operations
        totals[0] += loss.astype(np.float64) * len(y)
        totals[1:] += topk_correct(logits, y)
        count += len(y)
    model.free_activations()
    loss_sum, top1, top5, count = world.sum([*backend.to_numpy(totals).tolist(), count]).tolist()
    return dict(val_loss=loss_sum / count, val_top1=100.0 * top1 / count, val_top5=100.0 * top5 / count)

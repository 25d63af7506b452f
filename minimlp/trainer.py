"""The training loop: batches -> device -> normalize -> forward -> loss -> backward -> AdamW/LAMB,
an evaluation each epoch, a log line and a checkpoint each epoch, exact resume, Ctrl-C saves.

The state that makes resume exact (and that a checkpoint therefore holds): the weights, the
optimizer's moments and step, the drop-path generator, the loss scaler under --amp (minimlp.loss_scaling),
and where the run stands (epoch, next batch, global step, the partial epoch's loss sum). Batches depend only on (seed, epoch, batch index)
(minimlp.loader), and the learning rate only on the global step (minimlp.schedule).
"""
import json
import signal
import time

import numpy as np
from tqdm import tqdm

from . import backend
from .checkpoint import save_run
from .device_feed import DeviceFeed
from .loss_scaling import NoLossScaling
from .losses import cross_entropy
from .optim import AdamW, Lamb
from .precision import autocast
from .schedule import lr_at
from .step import train_step


READ_LOSS_EVERY = 20  # steps between reading the training loss back from the device (for the bar, the sum)


class Interrupted(Exception):
    """Ctrl-C was pressed; a checkpoint has been saved."""


def make_optimizer(name, model, lr, weight_decay):
    if name == "adamw":
        return AdamW(model, lr=lr, weight_decay=weight_decay)
    if name == "lamb":
        return Lamb(model, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"--opt {name!r}: choose adamw or lamb")


def topk_correct(logits, labels, ks=(1, 5)):
    """How many rows have their label among the k largest logits, for each k: a (len(ks),) array on the
    logits' device."""
    xp = backend.get_xp(logits)
    ranked = xp.argsort(-logits, axis=1)[:, :max(ks)]
    hits = ranked == labels[:, None]
    return xp.stack([hits[:, :k].any(axis=1).sum() for k in ks])


def evaluate(model, loader, feed=None, amp=False):
    """Mean loss (no label smoothing) and top-1/top-5 in percent over every batch of `loader`.
    amp: float16 matrix products, as in training with --amp. The sums stay on the device until the end,
    so the host never waits for the GPU between batches."""
    feed = feed or DeviceFeed(model.device, model.dtype)
    totals = model.xp.zeros(3, dtype=np.float64)  # loss sum, top-1 hits, top-5 hits
    count = 0
    for x, y in tqdm(feed.batches(loader.epoch(0)), total=len(loader), desc="eval", unit="batch",
                     dynamic_ncols=True, leave=False):
        with autocast(amp):
            logits = model.forward(x)
        loss, _ = cross_entropy(logits, y)
        totals[0] += loss.astype(np.float64) * len(y)
        totals[1:] += topk_correct(logits, y)
        count += len(y)
    model.free_activations()
    loss_sum, top1, top5 = backend.to_numpy(totals).tolist()
    return dict(val_loss=loss_sum / count, val_top1=100.0 * top1 / count, val_top5=100.0 * top5 / count)


class CtrlC:
    """While active, the first Ctrl-C only raises a flag (the loop saves and stops after the current
    step); a second one interrupts at once."""

    def __init__(self):
        self.pressed = False

    def __enter__(self):
        self.previous = signal.signal(signal.SIGINT, self.handle)
        return self

    def handle(self, signum, frame):
        self.pressed = True
        signal.signal(signal.SIGINT, self.previous)
        tqdm.write("Ctrl-C: saving a checkpoint after this step (press again to quit at once)")

    def __exit__(self, *exc_info):
        signal.signal(signal.SIGINT, self.previous)


class Trainer:
    """Wires a model, an optimizer and two loaders to the loop. `settings` is the run's configuration
    (train.py's parsed flags as a dict); `position` where to continue (from a checkpoint); `scaler` a
    loss_scaling.LossScaler for mixed precision (--amp), NoLossScaling for float32 throughout."""

    def __init__(self, model, optimizer, train_loader, val_loader, classes, settings, output, position=None,
                 scaler=NoLossScaling()):
        self.model, self.optimizer = model, optimizer
        self.train_loader, self.val_loader = train_loader, val_loader
        self.classes, self.settings, self.output = classes, settings, output
        self.scaler = scaler
        self.xp = model.xp
        self.feed = DeviceFeed(model.device, model.dtype)
        self.peak_gpu_bytes = 0  # sampled after every step (GPU only)
        steps_per_epoch = len(train_loader)
        self.total_steps = settings["epochs"] * steps_per_epoch
        self.warmup_steps = min(int(settings["warmup_epochs"] * steps_per_epoch), self.total_steps - 1)
        self.position = position or dict(epoch=0, batch=0, global_step=0, loss_sum=0.0, images=0,
                                         seconds=0.0, best_top1=None)

    def learning_rate(self, step):
        s = self.settings
        return lr_at(step, base_lr=s["lr"], total_steps=self.total_steps, warmup_steps=self.warmup_steps,
                     min_lr=s["min_lr"], warmup_lr=s["warmup_lr"])

    # -----------------------------------------------------------------------------------------
    def fit(self):
        """Train from self.position to the last epoch; returns the last epoch's log record."""
        record = None
        with CtrlC() as ctrl_c:
            while self.position["epoch"] < self.settings["epochs"]:
                self.train_epoch(ctrl_c)
                record = self.end_epoch(ctrl_c)
        return record

    def train_epoch(self, ctrl_c):
        p, s = self.position, self.settings
        epoch, loader = p["epoch"], self.train_loader
        bar = tqdm(total=len(loader), initial=p["batch"], desc=f"epoch {epoch + 1}/{s['epochs']}", unit="batch",
                   dynamic_ncols=True, leave=False)
        started = time.perf_counter()
        seconds_before = p["seconds"]
        pending = []  # (loss on the device, batch size) of the steps whose loss is not read back yet
        for x, y in self.feed.batches(loader.epoch(epoch, start_batch=p["batch"])):
            pending.append((self.train_step(x, y), len(y)))
            p["images"] += len(y)
            p["batch"] += 1
            p["global_step"] += 1
            p["seconds"] = seconds_before + time.perf_counter() - started
            if self.model.device == "gpu":
                self.peak_gpu_bytes = max(self.peak_gpu_bytes, backend.gpu_memory_held_bytes())
            bar.update()
            if len(pending) == READ_LOSS_EVERY or ctrl_c.pressed:
                self.read_losses(pending)
                bar.set_postfix(loss=f"{p['loss_sum'] / p['images']:.4f}", lr=f"{self.optimizer.lr:.2e}",
                                img_s=f"{p['images'] / max(p['seconds'], 1e-9):.0f}", refresh=False,
                                **(dict(skipped=self.scaler.skipped_steps) if self.scaler.half_precision else {}))
            if ctrl_c.pressed:
                bar.close()
                self.save("checkpoint.npz")
                raise Interrupted(f"stopped at epoch {epoch + 1}, batch {p['batch']}/{len(loader)}; "
                                  f"continue with --resume {self.output / 'checkpoint.npz'}")
        self.read_losses(pending)
        bar.close()

    def read_losses(self, pending):
        """Add the pending steps' losses to the epoch's sum, in step order (one transfer from the device,
        so the same sums whenever it happens), and stop on a loss that is not finite."""
        if not pending:
            return
        p = self.position
        values = backend.to_numpy(self.xp.stack([loss for loss, _ in pending]))
        first_step = p["global_step"] - len(pending)
        for index, (value, (_, images)) in enumerate(zip(values.tolist(), pending)):
            if not np.isfinite(value):
                raise FloatingPointError(f"the training loss became {value} at step {first_step + index}: "
                                         "lower --lr, or set --clip-grad")
            p["loss_sum"] += value * images
        pending.clear()

    def train_step(self, x, y):
        """One step of minimlp.step.train_step at the run's learning rate; returns the loss left on the device.
        Says so when --amp's loss scaler skips a step."""
        s = self.settings
        scale = self.scaler.scale
        loss, finite = train_step(self.model, self.optimizer, x, y, self.learning_rate(self.position["global_step"]),
                                  self.scaler, smoothing=s["smoothing"], clip_grad=s["clip_grad"])
        if not finite:
            tqdm.write(f"step {self.position['global_step'] + 1}: inf/NaN gradients at loss scale {scale:g}, "
                       f"step skipped (loss scale now {self.scaler.scale:g}; "
                       f"{self.scaler.skipped_steps} skipped so far)")
        return loss

    def end_epoch(self, ctrl_c):
        """Evaluate, log, checkpoint, and move the position to the next epoch."""
        p, s = self.position, self.settings
        if ctrl_c.pressed:  # pressed during the last step's bookkeeping: training is done, eval is not
            self.save("checkpoint.npz")
            raise Interrupted(f"stopped after the training part of epoch {p['epoch'] + 1}; continue with "
                              f"--resume {self.output / 'checkpoint.npz'}")
        metrics = evaluate(self.model, self.val_loader, self.feed, amp=self.scaler.half_precision)
        record = dict(epoch=p["epoch"] + 1, train_loss=p["loss_sum"] / max(p["images"], 1), **metrics,
                      lr=self.optimizer.lr, images_per_s=p["images"] / max(p["seconds"], 1e-9),
                      seconds=p["seconds"])
        extra = ""
        if self.scaler.half_precision:  # AMP runs only: steps skipped so far in the run, and the loss scale now
            record.update(skipped_steps=self.scaler.skipped_steps, loss_scale=self.scaler.scale)
            extra += f"  {record['skipped_steps']} skipped steps"
        if self.model.device == "gpu":  # GPU runs only
            record["peak_gpu_mem_gb"] = self.peak_gpu_bytes / 1e9
            extra += f"  peak GPU memory {record['peak_gpu_mem_gb']:.2f} GB"
        tqdm.write(f"epoch {record['epoch']}/{s['epochs']}  train loss {record['train_loss']:.4f}  "
                   f"val loss {record['val_loss']:.4f}  top-1 {record['val_top1']:.2f}%  "
                   f"top-5 {record['val_top5']:.2f}%  lr {record['lr']:.2e}  "
                   f"{record['images_per_s']:.0f} img/s  {record['seconds']:.1f} s" + extra)
        improved = p["best_top1"] is None or record["val_top1"] > p["best_top1"]
        if improved:
            p["best_top1"] = record["val_top1"]
        p.update(epoch=p["epoch"] + 1, batch=0, loss_sum=0.0, images=0, seconds=0.0)
        self.save("checkpoint.npz")
        if improved:
            self.save("best.npz")
        with open(self.output / "log.jsonl", "a") as log:  # after the checkpoint: a resume never logs twice
            log.write(json.dumps(record) + "\n")
        if ctrl_c.pressed:  # pressed during the evaluation: the epoch is complete and saved
            raise Interrupted(f"stopped after epoch {record['epoch']}; continue with "
                              f"--resume {self.output / 'checkpoint.npz'}")
        return record

    # -----------------------------------------------------------------------------------------
    def save(self, filename):
        save_run(self.output / filename, self.model, self.optimizer, self.scaler, self.position, self.classes,
                 self.settings)

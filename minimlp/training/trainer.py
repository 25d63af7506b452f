"""The training loop: batches -> device -> normalize -> random erasing -> Mixup/CutMix -> forward -> loss
(distillation: against the teacher's logits for the same batch) -> backward -> AdamW/LAMB -> EMA of the
weights; an evaluation each epoch (of the EMA too), a log line, a checkpoint and a picture each epoch (and
a checkpoint every --save-every minutes inside an epoch), exact resume; Ctrl-C, SIGTERM and SIGHUP save after
the current step (minimlp.training.signals); the evaluation is minimlp.training.evaluation's.

The state that makes resume exact (and that a checkpoint therefore holds): the weights, the
optimizer's moments and step, the drop-path generator, float16's loss scaler (minimlp.loss_scaling),
the EMA (--model-ema), and where the run stands (epoch, next batch, global step, the partial epoch's loss
sum). Batches depend only on (seed, epoch, batch index) (minimlp.data.loader), the learning rate only on the
global step (minimlp.schedule), and the erasing and Mixup/CutMix draws on generators seeded by where they
are (image_generators, mixup_generator): nothing of theirs to save.
"""
import sys
import time

import numpy as np

from .. import backend
from ..data.datasets import DataError
from ..data.device_feed import DeviceFeed
from ..data.workers import WorkerDied
from ..parallel.distributed import SingleProcess
from ..precision import policy
from ..schedule import lr_at
from ..step import train_step
from .checkpoint import read_meta, save_run
from .evaluation import evaluate
from .plot import PlotError, draw_run
from .progress import Progress, write
from .run_folder import append_log
from .signals import EXIT_WORKER_DIED, Interrupted, StopSignals


READ_LOSS_EVERY = 20  # steps between reading the training loss back from the device (for the bar, the sum)
ERASING_STREAM, MIXUP_STREAM = 1, 2  # what a generator is for, in its seed: each augmentation draws its own


class Trainer:
    """Wires a model, its loss, an optimizer and two loaders to the loop, each built by the caller (train.py).
    `criterion` the loss (minimlp.layers.CrossEntropy: its smoothing, 0 under Mixup/CutMix); `settings` the
    run's configuration (train.py's parsed flags as a dict: epochs, the schedule, clip_grad, seed, save_every;
    recorded in each checkpoint); `position` where to continue (from a checkpoint); `precision` a
    minimlp.precision.policy (--amp, --amp-dtype); `erasing` a minimlp.data.random_erasing.RandomErasing
    (--reprob), `mixup` a minimlp.data.mixup.Mixup (--mixup/--cutmix); `ema` a minimlp.training.ema.ModelEma
    (--model-ema); `distillation` a minimlp.training.distillation.Distillation (--distillation-type soft/hard);
    `run_estimate` a minimlp.training.estimates.RunTimeEstimate, told of every step (after_step)."""

    def __init__(self, model, criterion, optimizer, train_loader, val_loader, classes, settings, output,
                 position=None, precision=policy("float32"), erasing=None, mixup=None, ema=None, distillation=None,
                 world=SingleProcess(), run_estimate=None):
        self.model, self.criterion, self.optimizer = model, criterion, optimizer
        self.world = world  # data parallel (minimlp.parallel.distributed): rank 0 writes; gradients, losses, stops agreed
        self.train_loader, self.val_loader = train_loader, val_loader
        self.classes, self.settings, self.output = classes, settings, output
        self.precision = precision
        self.scaler = precision.loss_scaler  # float16's; None in float32 and bfloat16
        self.erasing, self.mixup = erasing, mixup
        self.ema, self.distillation = ema, distillation
        self.xp = model.xp
        self.feed = DeviceFeed(model.device, model.dtype)
        self.peak_gpu_bytes = 0  # sampled after every step (GPU only)
        steps_per_epoch = len(train_loader)
        self.total_steps = settings["epochs"] * steps_per_epoch
        self.position = position or dict(epoch=0, batch=0, global_step=0, loss_sum=0.0, images=0,
                                         seconds=0.0, best_top1=None)
        # The warmup's length is fixed when the run starts (and kept in the position): a resume that raises
        # --epochs must not recompute a warmup that the first --epochs had clipped, or the lr would jump.
        if self.position.get("warmup_epochs") != settings["warmup_epochs"]:  # a new run, or a new --warmup-epochs
            self.position.update(warmup_epochs=settings["warmup_epochs"],
                                 warmup_steps=min(int(settings["warmup_epochs"] * steps_per_epoch),
                                                  self.total_steps - 1))
        self.warmup_steps = min(self.position["warmup_steps"], self.total_steps - 1)
        self.signals = StopSignals()
        self.run_estimate = run_estimate  # says how long the run will take, after its first steps
        self.save_every = 60 * (settings.get("save_every") or 0)  # seconds between checkpoints inside an epoch
        self.last_save = time.monotonic()

    def learning_rate(self, step):
        s = self.settings
        return lr_at(step, base_lr=s["lr"], total_steps=self.total_steps, warmup_steps=self.warmup_steps,
                     min_lr=s["min_lr"], warmup_lr=s["warmup_lr"])

    # -----------------------------------------------------------------------------------------
    def fit(self):
        """Train from self.position to the last epoch; returns the last epoch's log record."""
        record = None
        with self.signals as stop:
            self.save_missing_best()
            while self.position["epoch"] < self.settings["epochs"]:
                try:
                    self.train_epoch(stop)
                    record = self.end_epoch(stop)
                except WorkerDied as died:  # the loader gave up on a batch: keep every step done so far
                    p = self.position
                    self.save("checkpoint.npz")
                    raise Interrupted(f"error: {died}. Stopped at epoch {p['epoch'] + 1}, batch {p['batch']}/"
                                      f"{len(self.train_loader)} ({self.what_was_saved()}); {self.resume_hint()}",
                                      EXIT_WORKER_DIED) from None
                except DataError as error:  # found while reading (a class with no readable image): keep the steps
                    p = self.position
                    self.save("checkpoint.npz")
                    raise DataError(f"{error} Stopped at epoch {p['epoch'] + 1}, batch {p['batch']}/"
                                    f"{len(self.train_loader)} ({self.what_was_saved()}): fix the data, then "
                                    f"{self.resume_hint()}") from None
        return record

    def save_missing_best(self):
        """A run killed between checkpoint.npz and best.npz at the end of its best epoch resumes from that very
        state: write the best.npz it did not get to."""
        p, best = self.position, self.output / "best.npz"
        if p.get("best_epoch") != p["epoch"] or p["batch"] != 0:
            return
        if not best.is_file() or read_meta(best)["position"]["epoch"] < p["epoch"]:
            self.save("best.npz")

    def what_was_saved(self):
        """After self.save() on one rank alone (its loader failed): only rank 0 writes (data parallel)."""
        return ("checkpoint saved" if self.world.is_writer else
                "not saved: rank 0 writes the checkpoints, and this rank's failure stops the job")

    def resume_hint(self):
        return f"continue with --resume {self.output / 'checkpoint.npz'}"

    def train_epoch(self, stop):
        p, s = self.position, self.settings
        epoch, loader = p["epoch"], self.train_loader
        bar = Progress(len(loader), f"epoch {epoch + 1}/{s['epochs']}", unit="batch", initial=p["batch"],
                       every=READ_LOSS_EVERY)
        started = time.perf_counter()
        seconds_before = p["seconds"]
        pending = []  # (loss on the device, batch size) of the steps whose loss is not read back yet
        batches = self.feed.batches(loader.epoch(epoch, start_batch=p["batch"]))
        while True:
            try:
                x, y = next(batches)
            except StopIteration:
                break
            except (WorkerDied, DataError):
                self.read_losses(pending)  # the steps done so far, for fit's checkpoint
                bar.close()
                raise
            pending.append((self.learn_from_batch(x, y), len(y)))
            p["batch"] += 1
            p["global_step"] += 1
            p["seconds"] = seconds_before + time.perf_counter() - started
            if self.run_estimate is not None:
                self.run_estimate.after_step(p["global_step"])
            if self.model.device == "gpu":
                self.peak_gpu_bytes = max(self.peak_gpu_bytes, backend.gpu_memory_held_bytes())
            postfix = {}
            stopping = stop.agree(self.world)
            if len(pending) == READ_LOSS_EVERY or stopping or p["batch"] == len(loader) or bar.due():
                self.read_losses(pending)
                postfix = dict(loss=f"{p['loss_sum'] / p['images']:.4f}", lr=f"{self.optimizer.lr:.2e}",
                               img_s=f"{p['images'] / max(p['seconds'], 1e-9):.0f}",
                               **(dict(skipped=self.scaler.skipped_steps) if self.scaler else {}))
            bar.update(1, **postfix)
            if stopping:
                bar.close()
                self.save("checkpoint.npz")
                raise Interrupted(f"{stop.name}: stopped at epoch {epoch + 1}, batch {p['batch']}/{len(loader)} "
                                  f"(checkpoint saved); {self.resume_hint()}", 128 + stop.agreed)
            if self.save_every and self.world.max(time.monotonic() - self.last_save >= self.save_every):  # --save-every
                self.read_losses(pending)
                self.save("checkpoint.npz")
        self.read_losses(pending)
        bar.close()

    def read_losses(self, pending):
        """Add the pending steps' losses to the epoch's sum, in step order (one transfer from the device,
        so the same sums whenever it happens), and stop on a loss that is not finite."""
        if not pending:
            return
        p = self.position
        values = backend.to_numpy(self.xp.stack([loss for loss, _ in pending]))
        images = np.array([count for _, count in pending], dtype=np.float64)
        # loss x images of each step, and its images, added up over the ranks (data parallel): the global batch's
        # sums and sizes (a rank's batch is short by the unreadable files its loader skipped; one all-reduce)
        totals = self.world.sum(np.concatenate([values * images, images]))
        sums, counts = totals[:len(pending)], totals[len(pending):]
        first_step = p["global_step"] - len(pending)
        for index, value in enumerate(sums.tolist()):
            if not np.isfinite(value):
                raise FloatingPointError(f"the training loss became {value} at step {first_step + index}: "
                                         "lower --lr, or set --clip-grad")
            p["loss_sum"] += value
        p["images"] += int(counts.sum())
        pending.clear()

    def image_generators(self, stream, count):
        """One generator per image of the batch about to be trained on, seeded by [seed, stream, epoch, batch,
        the image's place in the global batch]: a resumed run draws what the uninterrupted one did, and K
        ranks what one process draws for their batches together (rank r holds places r, r + K, ...: the
        sampler's striding)."""
        p = self.position
        places = self.world.rank + self.world.size * np.arange(count)
        return [np.random.default_rng([self.settings["seed"], stream, p["epoch"], p["batch"], place])
                for place in places.tolist()]

    def mixup_generator(self):
        """Mixup/CutMix's generator for the batch: seeded by [seed, stream, epoch, batch, rank]. It mixes each
        rank's batch with itself (its images in reverse order), so K ranks cannot mix as one process does;
        each rank draws its own lambda and box, as DeiT's ranks do (it seeds rank r with seed + r)."""
        p = self.position
        return np.random.default_rng([self.settings["seed"], MIXUP_STREAM, p["epoch"], p["batch"], self.world.rank])

    def learn_from_batch(self, x, y):
        """Augment the normalized batch on the device (erasing, then Mixup/CutMix: DeiT's order), then one step
        of minimlp.step.train_step at the run's learning rate (with the distillation loss when there is a
        teacher), then the EMA; returns the loss left on the device. Says so when float16's loss scaler skips
        a step."""
        if self.erasing is not None:
            x = self.erasing(x, self.image_generators(ERASING_STREAM, len(y)))
        if self.mixup is not None:
            x, y = self.mixup(x, y, self.mixup_generator())
        criterion = self.criterion
        if self.distillation is not None:  # the teacher sees the very batch the student does
            criterion = self.distillation.criterion_for(x, self.criterion.smoothing)
        scale = self.scaler.scale if self.scaler else None
        loss, finite = train_step(self.model, self.optimizer, x, y, self.learning_rate(self.position["global_step"]),
                                  self.precision, clip_grad=self.settings["clip_grad"], criterion=criterion,
                                  sync=self.world if self.world.size > 1 else None)  # data parallel only
        if self.ema is not None:  # after every step, as timm's ModelEma (a skipped step left the weights as they were)
            self.ema.update(self.model.parameters.data)
        if not finite:
            write(f"step {self.position['global_step'] + 1}: inf/NaN gradients at loss scale {scale:g}, "
                  f"step skipped (loss scale now {self.scaler.scale:g}; "
                  f"{self.scaler.skipped_steps} skipped so far)")
        return loss

    def end_epoch(self, stop):
        """Evaluate, log, checkpoint, and move the position to the next epoch."""
        p, s = self.position, self.settings
        if stop.agree(self.world):  # pressed during the last step's bookkeeping: training is done, eval is not
            self.save("checkpoint.npz")
            raise Interrupted(f"{stop.name}: stopped after the training part of epoch {p['epoch'] + 1} (checkpoint "
                              f"saved); {self.resume_hint()}", 128 + stop.agreed)
        metrics = evaluate(self.model, self.val_loader, self.feed, self.precision.matmul_dtype, world=self.world)
        if self.ema is not None:  # the average of the weights, evaluated in their place
            with self.ema.swapped_into(self.model.parameters.data):
                averaged = evaluate(self.model, self.val_loader, self.feed, self.precision.matmul_dtype,
                                    desc="eval EMA", world=self.world)
            metrics.update({f"ema_{name}": value for name, value in averaged.items()})
        record = dict(epoch=p["epoch"] + 1, train_loss=p["loss_sum"] / max(p["images"], 1), **metrics,
                      lr=self.optimizer.lr, images_per_s=p["images"] / max(p["seconds"], 1e-9),
                      seconds=p["seconds"])
        extra = ""
        if self.ema is not None:
            extra += f"  EMA top-1 {record['ema_val_top1']:.2f}%  top-5 {record['ema_val_top5']:.2f}%"
        if self.scaler:  # float16 runs only: steps skipped so far in the run, and the loss scale now
            record.update(skipped_steps=self.scaler.skipped_steps, loss_scale=self.scaler.scale)
            extra += f"  {record['skipped_steps']} skipped steps"
        if self.model.device == "gpu":  # GPU runs only
            record["peak_gpu_mem_gb"] = self.peak_gpu_bytes / 1e9
            extra += f"  peak GPU memory {record['peak_gpu_mem_gb']:.2f} GB"
        write(f"epoch {record['epoch']}/{s['epochs']}  train loss {record['train_loss']:.4f}  "
              f"val loss {record['val_loss']:.4f}  top-1 {record['val_top1']:.2f}%  "
              f"top-5 {record['val_top5']:.2f}%  lr {record['lr']:.2e}  "
              f"{record['images_per_s']:.0f} img/s  {record['seconds']:.1f} s" + extra, sys.stdout)
        improved = p["best_top1"] is None or record["val_top1"] > p["best_top1"]
        if improved:
            p.update(best_top1=record["val_top1"], best_epoch=record["epoch"])
        p.update(epoch=p["epoch"] + 1, batch=0, loss_sum=0.0, images=0, seconds=0.0)
        # The log line first, then checkpoint.npz, then best.npz: a kill in between leaves the log ahead of
        # the checkpoint, which the resume trims (minimlp.training.run_folder), or best.npz behind it, which the resume
        # writes (save_missing_best). A second signal waits for all three.
        with stop.deferred():
            if self.world.is_writer:  # rank 0 writes (data parallel)
                append_log(self.output / "log.jsonl", record)
            self.save("checkpoint.npz")
            if improved:
                self.save("best.npz")
        try:
            if self.world.is_writer:
                draw_run(self.output)  # curves.png, never more than an epoch old
        except (PlotError, OSError) as error:
            write(f"warning: could not draw {self.output / 'curves.png'}: {error}")
        if stop.agree(self.world):  # pressed during the evaluation: the epoch is complete and saved
            raise Interrupted(f"{stop.name}: stopped after epoch {record['epoch']} (checkpoint saved); "
                              f"{self.resume_hint()}", 128 + stop.agreed)
        return record

    # -----------------------------------------------------------------------------------------
    def save(self, filename):
        """Rank 0 writes: every rank holds the same weights, optimizer state, generators and position."""
        with self.signals.deferred():  # a second Ctrl-C/SIGTERM lets the file be written whole first
            if self.world.is_writer:
                save_run(self.output / filename, self.model, self.optimizer, self.precision, self.position,
                         self.classes, self.settings, self.ema)
        self.last_save = time.monotonic()

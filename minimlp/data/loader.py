"""Batches of uint8 images, decoded in parallel worker processes, exactly reproducible.

    with Loader(train_set, batch_size=256, train=True, img_size=224, seed=0) as loader:
        for images, labels in loader.epoch(epoch):      # images uint8 (B, 3, H, W), labels int64 (B,)
            ...

Reproducibility: the order of an epoch comes from a sampler (minimlp.data.sampler; train only): by
default the shuffle `np.random.default_rng([seed, epoch]).permutation(n)` (ShuffleSampler), with
--repeated-aug each image of it three times in a row (RepeatedAugmentationSampler). The sampler also gives each sample's
global position p, its place in the one-process order, and the augmentation of that sample uses its
own generator `np.random.default_rng([seed, epoch, p])`; so an image's augmentation does not depend on
how many processes share the epoch (data parallel: num_replicas/rank of the sampler). Evaluation takes
the dataset order. A batch therefore depends only on (seed, epoch, batch index): the same whatever the
number of workers, and `epoch(e, start_batch=k)` yields exactly the batches k, k+1, ... of an
uninterrupted epoch (resuming from a checkpoint). Training drops the last incomplete batch;
evaluation keeps it and does not shuffle.

Parallelism: `workers` processes from the 'spawn' context (the parent may have CUDA initialised, so
it is never forked; a script that uses a Loader with workers needs the `if __name__ == "__main__":`
guard). Each worker decodes a whole batch; up to `prefetch` batches are in flight so that the
consumer does not wait while cores are spare. `workers=0` loads in the calling process. Workers ignore
Ctrl-C, SIGTERM and SIGHUP; the parent stops them: on close(), on leaving the `with` block, and when an
epoch is abandoned early (break, exception, Ctrl-C) — then the pool is killed, not drained. A worker
that dies (the out-of-memory killer, kill -9) is seen at once and replaced, and its batches are loaded
again: the same batches (minimlp.data.workers). Workers die with the parent, also on kill -9.

Unreadable files (corrupt, truncated, not an image, deleted since the scan): the file is skipped,
its path is printed once as a warning line on stderr and appended to `loader.skipped`, and its batch
comes out one image shorter (so batch sizes can vary). If every file of a batch fails, DataError
names them: that is a broken dataset (or a wrong path), not a bad file; so it is when every file of
one class has failed (the class would never be seen). Data parallel, the ranks agree on the files
(world.collect, after each training batch, at the end of an evaluation, whose ranks may hold one batch
more or less): each file is warned once, by rank 0, and a class is counted over the files every rank
found, so K ranks refuse where one process does (each rank sees only its share of a class). An image larger than Pillow's decompression-bomb
limit (89M pixels) is decoded with a warning naming it; one over twice the limit is skipped as unreadable.
"""
import collections
import os
import warnings

import numpy as np
from PIL import Image

from .datasets import DataError
from ..parallel.distributed import SingleProcess
from ..training.progress import write
from .sampler import ShuffleSampler
from .transforms import eval_transform, train_transform
from .workers import WorkerPool

# Errors that mean "this file cannot be decoded". PIL raises SyntaxError for some broken headers.
UNREADABLE_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class Loader:
    """Batches of a dataset (anything with .samples = [(path, label)]) for one epoch at a time.

    img_size: output side. crop_pct: eval resize ratio. scale: RandomResizedCrop area range (train).
    interpolation, hflip, auto_augment: the train crop's filter, the flip probability, RandAugment or None
    (minimlp.data.transforms.train_transform). sampler (train): the order of each epoch, anything with
    epoch_order(epoch), global_positions() and len (default: the plain shuffle, ShuffleSampler). workers:
    processes (0 = in this process). prefetch: batches in flight (default 2 per worker).
    world: data parallel (minimlp.parallel.distributed), rank r of K: the default shuffle takes positions r, r + K,
    ... of the one-process order, n // K of them (so an epoch has the batches of one process with K x batch_size);
    evaluation takes the images r, r + K, ...: the K ranks together see every validation image exactly once;
    unreadable files are agreed over the ranks (report).
    """

    def __init__(self, dataset, batch_size, train, img_size, crop_pct=0.875, seed=0,
                 workers=None, prefetch=None, scale=(0.08, 1.0), interpolation="bilinear", hflip=0.5,
                 auto_augment=None, sampler=None, world=SingleProcess()):
        self.samples = list(dataset.samples)
        self.where = getattr(dataset, "root", "the dataset")
        if batch_size < 1:
            raise DataError(f"--batch-size must be at least 1, got {batch_size}")
        self.sampler = None
        if train:
            self.sampler = sampler or ShuffleSampler(len(self.samples), seed, num_replicas=world.size, rank=world.rank)
        self.eval_order = np.arange(len(self.samples))[world.rank::world.size]
        if train and batch_size > len(self.sampler):
            share = ("the training set", "images per epoch", "") if world.size == 1 else (
                "each rank's share of the training set", f"images per epoch on each of {world.size} ranks",
                " (it is per rank)")
            raise DataError(f"--batch-size {batch_size} is larger than {share[0]} ({len(self.sampler)} {share[1]}, of "
                            f"{len(self.samples)} in {self.where}): give --batch-size {len(self.sampler)} or less"
                            f"{share[2]}.")
        self.world = world
        self.batch_size = batch_size
        self.train = train
        self.settings = TransformSettings(train, img_size, crop_pct, scale, seed, interpolation, hflip, auto_augment)
        self.seed = seed
        self.workers = os.cpu_count() if workers is None else workers
        self.prefetch = max(1, 2 * self.workers if prefetch is None else prefetch)
        self.skipped = []
        self.classes = list(getattr(dataset, "classes", []))
        self.class_sizes = collections.Counter(label for _, label in self.samples)
        self.unreadable = collections.Counter()  # per label: files skipped
        self.warned = set()
        self.pool = None

    def __len__(self):
        """Batches per epoch."""
        if self.train:
            return len(self.sampler) // self.batch_size
        return -(-len(self.eval_order) // self.batch_size)

    def epoch_order(self, epoch):
        """Sample indices in the order of `epoch`: the sampler's (train) or 0..n-1 (eval)."""
        if self.train:
            return self.sampler.epoch_order(epoch)
        return self.eval_order

    def global_positions(self):
        """Each of epoch_order's samples' position in the one-process order (what seeds its augmentation)."""
        return self.sampler.global_positions() if self.train else self.eval_order

    def batch_tasks(self, epoch, start_batch):
        """BatchTask for each batch from start_batch to the end of the epoch."""
        order, global_positions = self.epoch_order(epoch), self.global_positions()
        for batch_index in range(start_batch, len(self)):
            where = slice(batch_index * self.batch_size, min((batch_index + 1) * self.batch_size, len(order)))
            samples = [self.samples[index] for index in order[where]]
            yield BatchTask(samples, epoch, global_positions[where].tolist(), self.settings)

    def epoch(self, epoch, start_batch=0):
        """Yield (images uint8 (B, 3, H, W), labels int64 (B,)) for batches start_batch.. of `epoch`."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch {start_batch} is outside 0..{len(self)} (batches per epoch)")
        tasks = self.batch_tasks(epoch, start_batch)
        results = map(load_batch, tasks) if self.workers == 0 else self.parallel_results(tasks)
        held = []  # evaluation's unreadable files, agreed at its end
        for images, labels, failures, notes in results:
            self.note(notes)
            if self.train:  # every rank has as many training batches: agreed after each
                self.report(failures)
            else:
                held.extend(failures)
            yield images, labels
        if not self.train:
            self.report(held)

    def parallel_results(self, tasks):
        """load_batch(task) for each task, in order, computed by the pool with `prefetch` in flight."""
        pool = self.start_pool()
        finished = False
        try:
            for task in tasks:
                pool.submit(task)
                if len(pool) >= self.prefetch:
                    yield pool.next_result()
            while len(pool):
                yield pool.next_result()
            finished = True
        finally:
            if not finished:  # abandoned early: drop the queued batches with the workers
                self.close()

    def start_pool(self):
        if self.pool is None:
            self.pool = WorkerPool(load_batch, self.workers, name="loader worker")
        return self.pool

    def note(self, notes):
        """notes: (path, warning) pairs, each said once."""
        for path, note in notes:
            if (path, note) not in self.warned:
                self.warned.add((path, note))
                write(f"warning: {path}: {note}")

    def report(self, failures):
        """failures [(path, label, reason)]: the unreadable files this rank found; world.collect adds the other
        ranks' (the same list on every rank). Each new one is warned once (by rank 0) and remembered in
        self.skipped; DataError on every rank at once (world.together: no abort) when no file of a class can
        be read."""
        found = {}
        for path, label, reason in self.world.collect(failures):
            if path not in self.skipped and path not in found:  # with --repeated-aug, two ranks can meet a file
                found[path] = label, reason
        if found:
            self.world.together(lambda: self.count_unreadable(found))

    def count_unreadable(self, found):
        """found: {path: (label, reason)} of files not seen before, the same on every rank."""
        for path, (label, reason) in found.items():
            self.skipped.append(path)
            if self.world.is_writer:
                write(f"warning: skipping unreadable image {path} ({reason})")  # a line of its own, never on a bar
            self.unreadable[label] += 1
            if self.unreadable[label] == self.class_sizes[label]:
                name = self.classes[label] if label < len(self.classes) else f"with label {label}"
                raise DataError(f"no image of class {name} in {self.where} can be read ({self.unreadable[label]}"
                                f" files, e.g. {path}: {reason}): the class would never be seen. Replace the "
                                "files, or remove the class folder.")

    def close(self):
        """Stop the worker processes (a later epoch starts new ones)."""
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


class TransformSettings:
    """What a worker needs to turn a path into an image; small, so it travels with every task."""

    def __init__(self, train, img_size, crop_pct, scale, seed, interpolation="bilinear", hflip=0.5,
                 auto_augment=None):
        self.train, self.img_size, self.crop_pct, self.scale, self.seed = train, img_size, crop_pct, scale, seed
        self.interpolation, self.hflip, self.auto_augment = interpolation, hflip, auto_augment

    def transform(self, path, epoch, position):
        """uint8 (3, img_size, img_size) for the sample at global `position` of `epoch`."""
        if self.train:
            rng = np.random.default_rng([self.seed, epoch, position])
            return train_transform(path, self.img_size, rng, self.scale, self.interpolation, self.hflip,
                                   self.auto_augment)
        return eval_transform(path, self.img_size, self.crop_pct)


class BatchTask:
    """One batch to load: its samples [(path, label)] of `epoch`, and the global position of each."""

    def __init__(self, samples, epoch, positions, settings):
        self.samples, self.epoch, self.positions, self.settings = samples, epoch, positions, settings


def load_batch(task):
    """BatchTask -> (images uint8 (B, 3, H, W), labels int64 (B,), failures [(path, label, reason)],
    notes [(path, warning)]).

    Runs in a worker process (or in the caller when workers=0). Unreadable files are left out. Pillow's
    DecompressionBombWarning does not say which file: it comes back as a note naming it.
    """
    images, labels, failures, notes = [], [], [], []
    for position, (path, label) in zip(task.positions, task.samples):
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", Image.DecompressionBombWarning)
                images.append(task.settings.transform(path, task.epoch, position))
            labels.append(label)
        except UNREADABLE_IMAGE_ERRORS as error:
            failures.append((path, label, f"{type(error).__name__}: {error}"))
        for warning in caught:
            if issubclass(warning.category, Image.DecompressionBombWarning):
                notes.append((path, f"{warning.message} (decoded anyway)"))
            else:  # not ours to change: shown as it would have been
                warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    if not images:
        shown = "; ".join(f"{path} ({reason})" for path, _, reason in failures[:3])
        more = f" and {len(failures) - 3} more" if len(failures) > 3 else ""
        raise DataError(f"every image of a batch failed to load: {shown}{more}. Check that these files are "
                        "images (and that the --data path is right).")
    return np.stack(images), np.asarray(labels, dtype=np.int64), failures, notes


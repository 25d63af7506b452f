"""The order of each training epoch: the plain shuffle (ShuffleSampler) and repeated augmentation
(RepeatedAugmentationSampler, Hoffer et al. 2020; Berman et al. 2019), as DeiT's RASampler and timm's
RepeatAugSampler: each image appears `repeats` (3) times in a row of the shuffled order, each time
with its own augmentation, and the epoch is cut to about the dataset's length, so an epoch sees about
a third of the images, three times each (DeiT's --repeated-aug).

    sampler = RepeatedAugmentationSampler(len(train_set), seed=0)          # one process
    order = sampler.epoch_order(epoch)           # sample indices of this epoch, len(sampler) of them
    positions = sampler.global_positions()       # each one's position in the one-process order

The one-process order of an epoch is the permutation np.random.default_rng([seed, epoch]) draws
(the loader's shuffle), each index repeated `repeats` times: [p0, p0, p0, p1, p1, p1, ...]. Data
parallel: rank r of K takes the positions r, r + K, r + 2K, ... of that one order (DeiT's striding),
so the 3 copies of an image go to 3 different ranks, and the K shards interleaved are exactly the
one-process order. Augmenting the sample at global position p with the generator [seed, epoch, p]
therefore gives the same images whatever K is.

Epoch length per rank (timm's num_selected_samples): floor(n // 256 * 256 / K) when n >= 256 (DeiT
rounds the dataset down to a multiple of 256), else floor(n / K). Set selected_round=0 for the latter
always. Two differences from DeiT/timm: they seed the shuffle with the epoch alone (the same order for
every --seed), we use [seed, epoch], as the plain shuffle does; and below 256 images timm takes
ceil(n / K) per rank, so that K ranks take up to K - 1 positions more than one process and, with b
images per rank, can make one step more than one process with K x b (159 images, 2 x 8: 10 steps
against 9). floor keeps K ranks x b equal to one process x K*b for every n: both take the positions
0 .. floor(n / (K b)) K b - 1 in whole batches.
"""
import numpy as np


def samples_per_rank(num_samples, num_replicas=1, selected_round=256):
    """How many samples each of num_replicas ranks takes per epoch (timm's RepeatAugSampler, floor below
    selected_round images: see above)."""
    if selected_round and num_samples >= selected_round:
        return num_samples // selected_round * selected_round // num_replicas
    return num_samples // num_replicas


class ShuffleSampler:
    """The plain shuffle: each epoch the permutation np.random.default_rng([seed, epoch]) draws, every sample
    once; rank `rank` of `num_replicas` takes its positions rank, rank + K, ..., num_samples // K of them."""

    def __init__(self, num_samples, seed=0, num_replicas=1, rank=0):
        if num_samples < 1:
            raise ValueError(f"a sampler needs at least one sample, got {num_samples}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside 0..{num_replicas - 1} (num_replicas {num_replicas})")
        self.num_samples, self.seed = num_samples, seed
        self.num_replicas, self.rank = num_replicas, rank
        self.length = num_samples // num_replicas

    def __len__(self):
        """Samples this rank takes per epoch."""
        return self.length

    def permutation(self, epoch):
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)

    def global_positions(self):
        """Positions in the one-process order that this rank takes: rank, rank + K, ... (length len(self))."""
        return np.arange(self.rank, self.length * self.num_replicas, self.num_replicas)

    def order_from_permutation(self, permutation):
        """This rank's sample indices for a given shuffle: the rank's positions of it."""
        return np.asarray(permutation)[self.global_positions()]

    def epoch_order(self, epoch):
        """Sample indices of this rank for `epoch`."""
        return self.order_from_permutation(self.permutation(epoch))


class RepeatedAugmentationSampler(ShuffleSampler):
    """The samples of rank `rank` of `num_replicas` for each epoch, deterministic in (seed, epoch): the shuffle
    with every index repeated `repeats` times."""

    def __init__(self, num_samples, seed=0, repeats=3, num_replicas=1, rank=0, selected_round=256):
        super().__init__(num_samples, seed, num_replicas, rank)
        if not (isinstance(repeats, int) and repeats >= 1):
            raise ValueError(f"repeats must be a whole number >= 1, got {repeats}")
        self.repeats = repeats
        self.length = samples_per_rank(num_samples, num_replicas, selected_round)

    def order_from_permutation(self, permutation):
        """This rank's sample indices for a given shuffle: every index repeated, then the rank's positions
        (K shards never need more than the repeated list holds: timm's wrap-around padding is not needed)."""
        return np.repeat(np.asarray(permutation), self.repeats)[self.global_positions()]

"""Repeated augmentation against timm's RepeatAugSampler (DeiT's RASampler): the same shuffle gives the
same indices on every rank; the shards of K ranks interleave into the one-process order."""
import numpy as np
import pytest

from minimlp.data.sampler import RepeatedAugmentationSampler, ShuffleSampler, samples_per_rank
from minimlp.tools.pytorch_references import torch  # noqa: F401  (and timm through the torchvision workaround)
from timm.data.distributed_sampler import RepeatAugSampler  # noqa: E402


@pytest.mark.parametrize("num_samples", [10, 255, 256, 1000, 1283])
@pytest.mark.parametrize("num_replicas", [1, 2, 3, 4, 8])
def test_each_rank_takes_timms_indices_for_the_same_shuffle(num_samples, num_replicas):
    for epoch in (0, 3):
        generator = torch.Generator()
        generator.manual_seed(epoch)  # what timm's sampler shuffles with
        permutation = torch.randperm(num_samples, generator=generator).numpy()
        for rank in range(num_replicas):
            theirs = RepeatAugSampler(list(range(num_samples)), num_replicas=num_replicas, rank=rank)
            theirs.set_epoch(epoch)
            ours = RepeatedAugmentationSampler(num_samples, num_replicas=num_replicas, rank=rank)
            # below 256 images timm takes ceil(n / K) per rank, we floor(n / K): a prefix of its order
            assert len(ours) == (len(theirs) if num_samples >= 256 else num_samples // num_replicas)
            assert ours.order_from_permutation(permutation).tolist() == list(theirs)[:len(ours)]


def test_epoch_lengths():
    assert samples_per_rank(1_281_167) == 1_281_024  # ImageNet rounded down to a multiple of 256
    assert samples_per_rank(1_281_167, num_replicas=8) == 160_128
    assert samples_per_rank(1400) == 1280 and samples_per_rank(100) == 100
    assert samples_per_rank(1400, selected_round=0) == 1400
    assert samples_per_rank(10, num_replicas=4) == 2  # floor(10 / 4): K ranks take no more than one process


@pytest.mark.parametrize("num_samples", [159, 255, 256, 1283])
@pytest.mark.parametrize("num_replicas, batch_size", [(2, 8), (3, 5), (4, 16)])
def test_k_ranks_take_the_batches_of_one_process_for_any_number_of_images(num_samples, num_replicas, batch_size):
    """K ranks x b make as many steps as one process x K*b, and their batches together hold its batches' samples
    at its positions (159 images, 2 x 8: 9 steps each; timm's ceil(n / K) per rank would make 10)."""
    one = RepeatedAugmentationSampler(num_samples, seed=2)
    ranks = [RepeatedAugmentationSampler(num_samples, seed=2, num_replicas=num_replicas, rank=rank)
             for rank in range(num_replicas)]
    steps = len(one) // (num_replicas * batch_size)
    assert [len(shard) // batch_size for shard in ranks] == [steps] * num_replicas
    taken = steps * num_replicas * batch_size
    positions = np.sort(np.concatenate([shard.global_positions()[:steps * batch_size] for shard in ranks]))
    assert np.array_equal(positions, one.global_positions()[:taken])
    interleaved = np.empty(taken, dtype=np.int64)
    for rank, shard in enumerate(ranks):
        interleaved[rank::num_replicas] = shard.epoch_order(1)[:steps * batch_size]
    assert np.array_equal(interleaved, one.epoch_order(1)[:taken])


def test_one_process_order_repeats_each_image_three_times_in_a_row():
    sampler = RepeatedAugmentationSampler(1000, seed=5)
    order = sampler.epoch_order(2)
    permutation = np.random.default_rng([5, 2]).permutation(1000)
    assert len(order) == 768  # 1000 // 256 * 256
    assert np.array_equal(order, np.repeat(permutation[:256], 3))
    assert np.array_equal(sampler.global_positions(), np.arange(768))
    counts = np.bincount(order, minlength=1000)
    assert set(counts) == {0, 3} and (counts == 3).sum() == 256


@pytest.mark.parametrize("num_replicas", [2, 4, 8])
def test_shards_interleave_into_the_one_process_order(num_replicas):
    one_process = RepeatedAugmentationSampler(2048, seed=1)
    shards = [RepeatedAugmentationSampler(2048, seed=1, num_replicas=num_replicas, rank=rank)
              for rank in range(num_replicas)]
    interleaved = np.empty(len(one_process), dtype=np.int64)
    positions = np.empty(len(one_process), dtype=np.int64)
    for rank, shard in enumerate(shards):
        interleaved[rank::num_replicas] = shard.epoch_order(4)
        positions[rank::num_replicas] = shard.global_positions()
    assert np.array_equal(interleaved, one_process.epoch_order(4))
    assert np.array_equal(positions, np.arange(len(one_process)))
    # the three copies of an image land on three different ranks (K >= 3), as DeiT intends
    if num_replicas >= 3:
        assert all(np.bincount(shard.epoch_order(4)).max() == 1 for shard in shards)


def test_order_is_deterministic_per_seed_and_epoch():
    sampler = RepeatedAugmentationSampler(600, seed=3)
    assert np.array_equal(sampler.epoch_order(1), RepeatedAugmentationSampler(600, seed=3).epoch_order(1))
    assert not np.array_equal(sampler.epoch_order(1), sampler.epoch_order(2))
    assert not np.array_equal(sampler.epoch_order(1), RepeatedAugmentationSampler(600, seed=4).epoch_order(1))


@pytest.mark.parametrize("settings, complaint", [
    (dict(num_samples=0), "at least one sample"), (dict(num_samples=5, repeats=0), "repeats"),
    (dict(num_samples=5, num_replicas=2, rank=2), r"rank 2 is outside 0..1")])
def test_bad_settings(settings, complaint):
    with pytest.raises(ValueError, match=complaint):
        RepeatedAugmentationSampler(**settings)


def test_the_plain_shuffle_is_its_own_sampler_every_sample_once_the_shards_interleaved():
    one_process = ShuffleSampler(23, seed=4)
    order = one_process.epoch_order(2)
    assert sorted(order.tolist()) == list(range(23)) and len(one_process) == 23
    np.testing.assert_array_equal(order, np.random.default_rng([4, 2]).permutation(23))
    shards = [ShuffleSampler(23, seed=4, num_replicas=3, rank=rank) for rank in range(3)]
    assert [len(shard) for shard in shards] == [23 // 3] * 3
    for shard in shards:  # rank r takes the positions r, r + 3, ... of the one-process order
        np.testing.assert_array_equal(shard.epoch_order(2), order[shard.global_positions()])

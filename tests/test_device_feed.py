"""DeviceFeed: every batch arrives on the device, normalized, in order, whatever its size. On the GPU
this checks the double-buffered pinned copies (a missing event wait shows as a batch holding another
batch's pixels); on the CPU the feed is a pass-through."""
import numpy as np

from minimlp.backend import to_numpy
from minimlp.device_feed import DeviceFeed
from minimlp.transforms import normalize


def host_batches(sizes, img_size=8):
    """uint8 batches of the given sizes, each with its own pixels and labels."""
    for index, size in enumerate(sizes):
        rng = np.random.default_rng(index)
        yield rng.integers(0, 256, (size, 3, img_size, img_size), dtype=np.uint8), rng.integers(0, 1000, size)


def test_batches_arrive_normalized_in_order_on_the_device(xp, device):
    sizes = [4, 4, 3, 6, 6, 1, 6]  # a short last batch, a larger one later (new buffers), single image
    feed = DeviceFeed(device, "float32")
    received = list(feed.batches(host_batches(sizes)))  # all kept: a later copy must not overwrite an earlier batch
    assert len(received) == len(sizes)
    for (images, labels), (x, y) in zip(host_batches(sizes), received):
        assert isinstance(x, xp.ndarray) and isinstance(y, xp.ndarray)
        assert x.dtype == np.float32 and x.shape == images.shape
        np.testing.assert_array_equal(to_numpy(y), labels)
        np.testing.assert_allclose(to_numpy(x), normalize(images), rtol=1e-6, atol=1e-6)


def test_a_feed_is_reused_across_epochs(device):
    feed = DeviceFeed(device, "float32")
    for _ in range(2):  # train and eval share one feed in the trainer
        (x, y), = feed.batches(host_batches([5]))
        images, labels = next(host_batches([5]))
        np.testing.assert_allclose(to_numpy(x), normalize(images), rtol=1e-6, atol=1e-6)


def test_no_batches_gives_no_batches(device):
    assert list(DeviceFeed(device, "float32").batches(iter([]))) == []

"""DeviceFeed: every batch arrives on the device, normalized, in order, whatever its size. On the GPU
this checks the double-buffered pinned copies (a missing event wait shows as a batch holding another
batch's pixels); on the CPU the feed is a pass-through."""
import subprocess
import sys
from types import SimpleNamespace

import numpy as np

from minimlp.data import device_feed
from minimlp.backend import to_numpy
from minimlp.data.device_feed import DeviceFeed
from minimlp.data.device_feed import normalize


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


# ---------------------------------------------------------------------------------------------
# The GPU feed's stream ordering, checked on the CPU: a fake CuPy whose streams and events keep a timeline.
# ---------------------------------------------------------------------------------------------
class Timeline:
    """Every access to a buffer, on the stream (or the host) that makes it. An access conflicts with an earlier
    one on another stream when either writes (an allocation counts as a write: CuPy's pool may hand out memory
    that work queued earlier on the allocating stream still uses). It is ordered after it if the earlier one
    was the host's (done before the host queued this one) or if its stream waited for an event recorded
    after it there (the host: synchronized on it); otherwise it is a race."""

    def __init__(self):
        self.position, self.accesses, self.races = 0, {}, []
        self.host = FakeStream(self, "host")
        self.compute = FakeStream(self, "compute")  # the current stream
        self.streams = [self.compute]

    def tick(self):
        self.position += 1
        return self.position

    def access(self, buffer, stream, kind):
        position = self.tick()
        for other_stream, other_position, other_kind in self.accesses.setdefault(buffer, []):
            conflict = "read" not in (kind, other_kind) or kind != other_kind
            ordered = (other_stream in (stream, self.host)  # the host's accesses precede what it enqueues later
                       or any(waited is other_stream and recorded > other_position
                              for waited, recorded in stream.waits))
            if conflict and not ordered:
                self.races.append(f"{kind} of {buffer} on the {stream.name} stream is not ordered after the "
                                  f"{other_kind} on the {other_stream.name} stream")
        self.accesses[buffer].append((stream, position, kind))


class FakeStream:
    def __init__(self, timeline, name):
        self.timeline, self.name, self.waits = timeline, name, []  # waits: (stream, position) waited for

    def wait_event(self, event):
        if event.point is not None:
            self.waits.append(event.point)


class FakeEvent:
    def __init__(self, timeline):
        self.timeline, self.point = timeline, None  # never recorded: complete

    def record(self, stream):
        self.point = (stream, self.timeline.tick())

    def synchronize(self):
        self.timeline.host.wait_event(self)


class TrackedArray(np.ndarray):
    """A NumPy array standing for GPU or pinned memory: its accesses go to the timeline."""
    timeline, buffer = None, None

    def __array_finalize__(self, obj):  # views (slices) keep their buffer's name
        self.timeline, self.buffer = getattr(obj, "timeline", None), getattr(obj, "buffer", None)

    @classmethod
    def allocate(cls, timeline, name, shape, dtype, stream):
        array = np.zeros(shape, dtype).view(cls)
        array.timeline, array.buffer = timeline, f"{name} {len(timeline.accesses)}"
        timeline.access(array.buffer, stream, "allocation")
        return array

    def set(self, host, stream):  # cupy.ndarray.set: an asynchronous copy on `stream`
        host.timeline.access(host.buffer, stream, "read")
        self.timeline.access(self.buffer, stream, "write")
        self.view(np.ndarray)[...] = host

    def astype(self, dtype):  # a kernel on the current stream reads the buffer
        self.timeline.access(self.buffer, self.timeline.compute, "read")
        return self.view(np.ndarray).astype(dtype)

    def copy(self):
        self.timeline.access(self.buffer, self.timeline.compute, "read")
        return self.view(np.ndarray).copy()

    def __array_function__(self, function, types, args, kwargs):
        if function is np.copyto:  # the host writes a pinned buffer
            self.timeline.access(self.buffer, self.timeline.host, "write")
        return super().__array_function__(function, types, args, kwargs)


def fake_cupy(timeline):
    def new_stream(non_blocking=False):
        timeline.streams.append(FakeStream(timeline, "copy"))
        return timeline.streams[-1]

    cuda = SimpleNamespace(Stream=new_stream, Event=lambda: FakeEvent(timeline),
                           get_current_stream=lambda: timeline.compute)
    return SimpleNamespace(cuda=cuda, empty=lambda shape, dtype: TrackedArray.allocate(
        timeline, "device buffer", shape, dtype, timeline.compute))


def test_gpu_feed_orders_every_access_across_its_streams(monkeypatch):
    """Host writes to pinned memory, copies on the copy stream, normalization on the compute stream: each
    access that follows a conflicting one on another stream waits for it, by an event, including the first
    copy into freshly allocated buffers (which the compute stream's memory pool may still be using)."""
    timeline = Timeline()
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(timeline))
    monkeypatch.setattr(device_feed, "pinned_empty", lambda shape, dtype: TrackedArray.allocate(
        timeline, "pinned buffer", shape, dtype, timeline.host))
    sizes = [4, 4, 3, 6, 6, 1, 6]  # the larger batch reallocates both slots
    received = list(DeviceFeed("gpu", "float32").batches(host_batches(sizes)))
    assert timeline.races == [], "\n".join(timeline.races)
    assert len(timeline.streams) == 2  # compute and one copy stream
    assert len(timeline.accesses) == 16  # 4 slot allocations (2, then both again for the larger batch) x 4 buffers
    for (images, labels), (x, y) in zip(host_batches(sizes), received):
        np.testing.assert_array_equal(y, labels)
        np.testing.assert_allclose(x, normalize(images), rtol=1e-6, atol=1e-6)


def test_the_device_side_does_not_reach_back_into_the_pillow_side():
    """normalize lives with the device (minimlp.data.device_feed): the feed imports no Pillow transform."""
    code = "import sys, minimlp.data.device_feed; print(sorted(m for m in sys.modules if m.split('.')[0] == 'PIL' " \
           "or m == 'minimlp.data.transforms'))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"

"""Reading a files shard: in order, every file once, ahead of decoding but bounded.

Local files are read in the decoding thread with the kernel reading ahead; files on
other filesystems by a pool of threads. Both give the same records."""

import os
import warnings
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import pytest

from imgembed.pipelines import sources
from imgembed.pipelines.shards import InputShard, pieces_largest_first
from imgembed.transforms.decode import DecodeLimits, ImageError


def files_shard(tmp_path, sizes: list[int]) -> InputShard:
    paths = []
    for number, size in enumerate(sizes):
        path = tmp_path / f"{number:03d}.jpg"
        path.write_bytes(bytes([number % 256]) * size)
        paths.append(str(path))
    return InputShard("files", tuple(paths), tuple(sizes))


def read_locally(shard, limits):
    return list(sources._local_files(shard, limits))


def read_in_threads(shard, limits):
    with ThreadPoolExecutor(4) as reader:
        return list(sources._files_in_threads(shard, limits, reader))


@pytest.mark.parametrize("read", [read_locally, read_in_threads])
def test_files_come_in_order_and_bad_ones_as_specific_errors(tmp_path, read):
    shard = files_shard(tmp_path, [10, 0, 30, 5000, 20] + [7] * 20)
    gone = shard.paths[4]
    (tmp_path / "004.jpg").unlink()  # listed, then deleted before it is read
    records = read(shard, DecodeLimits(max_file_bytes=1000))
    assert [uri for uri, _ in records] == list(shard.paths)
    assert records[0][1] == bytes([0]) * 10
    assert records[2][1] == bytes([2]) * 30
    assert records[-1][1] == bytes([24]) * 7
    reasons = {uri: data.reason for uri, data in records if isinstance(data, ImageError)}
    assert reasons == {
        shard.paths[1]: "empty_file",
        shard.paths[3]: "file_too_large",
        gone: sources.READ_FAILED,
    }


class RecordingReader:
    """Reads at once when asked, and records the size of every file asked for."""

    def __init__(self):
        self.submitted: list[int] = []

    def submit(self, function, path, size, limits):
        self.submitted.append(size)
        future = Future()
        future.set_result(function(path, size, limits))
        return future


@pytest.mark.parametrize("sizes", [[100] * 40, [100, 700, 300, 900, 50, 600, 20, 800, 400, 10] * 3])
def test_reading_ahead_in_threads_is_bounded_in_files_and_bytes(tmp_path, monkeypatch, sizes):
    monkeypatch.setattr(sources, "READ_AHEAD_BYTES", 1000)
    shard = files_shard(tmp_path, sizes)
    reader = RecordingReader()
    consumed, most_ahead = 0, 0
    for _ in sources._files_in_threads(shard, DecodeLimits(), reader):
        consumed += 1
        ahead = reader.submitted[consumed:]
        assert len(ahead) <= sources.READ_AHEAD_FILES
        assert sum(ahead) <= 1000
        most_ahead = max(most_ahead, len(ahead))
    assert consumed == len(sizes) == len(reader.submitted)
    assert most_ahead > 1  # it does read ahead, or nothing would overlap decoding


def test_local_files_are_read_without_threads_and_remote_ones_with(tmp_path, monkeypatch):
    local = files_shard(tmp_path, [10] * 5)
    reader = RecordingReader()
    assert [data for _, data in sources._image_files(local, DecodeLimits(), reader)] == [
        bytes([number]) * 10 for number in range(5)
    ]
    assert reader.submitted == []

    remote = InputShard("files", tuple(f"gs://bucket/{number}.jpg" for number in range(3)), (10,) * 3)
    monkeypatch.setattr(sources, "_read_file", lambda path, size, limits: path.encode())
    records = list(sources._image_files(remote, DecodeLimits(), reader))
    assert [data for _, data in records] == [path.encode() for path in remote.paths]
    assert reader.submitted == [10] * 3


def test_local_reading_keeps_a_bounded_number_of_files_open(tmp_path):
    shard = files_shard(tmp_path, [10] * 40)
    opened_before = len(os.listdir("/proc/self/fd"))
    most_open = 0
    for _ in sources._local_files(shard, DecodeLimits()):
        most_open = max(most_open, len(os.listdir("/proc/self/fd")) - opened_before)
    assert 1 < most_open <= sources.READ_AHEAD_FILES + 1
    assert len(os.listdir("/proc/self/fd")) == opened_before

    # Stopped early (a failed bundle), it closes its files itself: no "unclosed file".
    stopped_early = sources._local_files(shard, DecodeLimits())
    next(stopped_early)
    assert len(os.listdir("/proc/self/fd")) > opened_before
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        stopped_early.close()
    assert not [warning for warning in caught if issubclass(warning.category, ResourceWarning)]
    assert len(os.listdir("/proc/self/fd")) == opened_before


def test_pieces_dealt_round_robin_largest_first_give_workers_even_bytes():
    # 40 shards of 500 photos, 20 KB to 5 MB: 15 pieces of 32 files and one of 20 each.
    rng = np.random.default_rng(0)
    shards = {
        f"shard{number:02d}": InputShard(
            "files",
            tuple(f"/{number}/{file}.jpg" for file in range(500)),
            tuple(int(size) for size in np.exp(rng.uniform(np.log(20e3), np.log(5e6), 500))),
        )
        for number in range(40)
    }
    pieces = pieces_largest_first(shards)
    assert pieces == pieces_largest_first(dict(reversed(shards.items())))  # one order, every run
    assert sorted(path for _, piece in pieces for path in piece.paths) == sorted(
        path for shard in shards.values() for path in shard.paths
    )
    assert all(set(piece.paths) <= set(shards[key].paths) for key, piece in pieces)
    piece_bytes = [sum(piece.sizes) for _, piece in pieces]

    def spread(order, workers):
        """The local runner deals a stage's elements to its workers round-robin."""
        shares = [sum(order[worker::workers]) for worker in range(workers)]
        return max(shares) - min(shares)

    bound = max(piece_bytes) - min(piece_bytes)  # 0.5% of a share for two workers
    in_shard_order = [sum(piece.sizes) for shard in shards.values() for piece in shard.pieces()]
    for workers in (2, 3, 4):
        assert spread(piece_bytes, workers) <= bound
        assert spread(in_shard_order, workers) > bound  # 1.4% to 16% of a share

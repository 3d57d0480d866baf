"""Reading a files shard: in order, every file once, ahead of decoding but bounded."""

from concurrent.futures import Future, ThreadPoolExecutor

import pytest

from pipelines import sources
from pipelines.shards import InputShard
from transforms.decode import DecodeLimits, ImageError


def files_shard(tmp_path, sizes: list[int]) -> InputShard:
    paths = []
    for number, size in enumerate(sizes):
        path = tmp_path / f"{number:03d}.jpg"
        path.write_bytes(bytes([number % 256]) * size)
        paths.append(str(path))
    return InputShard("files", tuple(paths), tuple(sizes))


def test_files_come_in_order_and_bad_ones_as_specific_errors(tmp_path):
    shard = files_shard(tmp_path, [10, 0, 30, 5000, 20])
    gone = shard.paths[4]
    (tmp_path / "004.jpg").unlink()  # listed, then deleted before it is read
    with ThreadPoolExecutor(4) as reader:
        records = list(sources._image_files(shard, DecodeLimits(max_file_bytes=1000), reader))
    assert [uri for uri, _ in records] == list(shard.paths)
    assert records[0][1] == bytes([0]) * 10
    assert records[2][1] == bytes([2]) * 30
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
def test_reading_ahead_is_bounded_in_files_and_bytes(tmp_path, monkeypatch, sizes):
    monkeypatch.setattr(sources, "READ_AHEAD_BYTES", 1000)
    shard = files_shard(tmp_path, sizes)
    reader = RecordingReader()
    consumed, most_ahead = 0, 0
    for _ in sources._image_files(shard, DecodeLimits(), reader):
        consumed += 1
        ahead = reader.submitted[consumed:]
        assert len(ahead) <= sources.READ_AHEAD_FILES
        assert sum(ahead) <= 1000
        most_ahead = max(most_ahead, len(ahead))
    assert consumed == len(sizes) == len(reader.submitted)
    assert most_ahead > 1  # it does read ahead, or nothing would overlap decoding

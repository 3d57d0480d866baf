"""Reading a shard: in order, every input once, ahead of decoding but bounded; faults
that are the input's own become errors, the rest are retried or stop the shard; and
what the shard says about each image comes along as its metadata."""

import io
import json
import os
import tarfile
import warnings
from concurrent.futures import Future, ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imgembed.pipelines import sources
from imgembed.pipelines.shards import InputFormat, InputShard, plan_shards
from imgembed.transforms.decode import DecodeLimits, ImageError

NO_PAUSES = sources.ReadOptions(retry_pauses=(0.0, 0.0))


def files_shard(tmp_path, sizes: list[int]) -> InputShard:
    paths = []
    for number, size in enumerate(sizes):
        path = tmp_path / f"{number:03d}.jpg"
        path.write_bytes(bytes([number % 256]) * size)
        paths.append(str(path))
    return InputShard("files", tuple(paths), tuple(sizes))


def read_locally(shard, options):
    return list(sources._local_files(shard, options))


def read_in_threads(shard, options):
    with ThreadPoolExecutor(4) as reader:
        return list(sources._files_in_threads(shard, options, reader))


@pytest.mark.parametrize("read", [read_locally, read_in_threads])
def test_files_come_in_order_and_bad_ones_as_specific_errors(tmp_path, read):
    shard = files_shard(tmp_path, [10, 0, 30, 5000, 20] + [7] * 20)
    gone = shard.paths[4]
    (tmp_path / "004.jpg").unlink()  # listed, then deleted before it is read
    records = read(shard, sources.ReadOptions(DecodeLimits(max_file_bytes=1000), retry_pauses=()))
    assert [uri for uri, _ in records] == list(shard.paths)
    assert records[0][1] == bytes([0]) * 10
    assert records[2][1] == bytes([2]) * 30
    assert records[-1][1] == bytes([24]) * 7
    reasons = {uri: data.reason for uri, data in records if isinstance(data, ImageError)}
    assert reasons == {
        shard.paths[1]: "empty_file",
        shard.paths[3]: "file_too_large",
        gone: sources.NOT_FOUND,
    }


class RecordingReader:
    """Reads at once when asked, and records the size of every file asked for."""

    def __init__(self):
        self.submitted: list[int] = []

    def submit(self, function, path, size, options):
        self.submitted.append(size)
        future = Future()
        try:
            future.set_result(function(path, size, options))
        except Exception as error:
            future.set_exception(error)
        return future


@pytest.mark.parametrize("sizes", [[100] * 40, [100, 700, 300, 900, 50, 600, 20, 800, 400, 10] * 3])
def test_reading_ahead_in_threads_is_bounded_in_files_and_bytes(tmp_path, monkeypatch, sizes):
    monkeypatch.setattr(sources, "READ_AHEAD_BYTES", 1000)
    shard = files_shard(tmp_path, sizes)
    reader = RecordingReader()
    consumed, most_ahead = 0, 0
    for _ in sources._files_in_threads(shard, sources.ReadOptions(), reader):
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
    records = list(sources.read_shard(local, sources.ReadOptions(), reader))
    assert [record.data for record in records] == [bytes([number]) * 10 for number in range(5)]
    assert reader.submitted == []

    remote = InputShard("files", tuple(f"gs://bucket/{number}.jpg" for number in range(3)), (10,) * 3)
    monkeypatch.setattr(sources, "_read_all", lambda path: path.encode())
    records = list(sources.read_shard(remote, sources.ReadOptions(), reader))
    assert [record.data for record in records] == [path.encode() for path in remote.paths]
    assert reader.submitted == [10] * 3


def test_local_reading_keeps_a_bounded_number_of_files_open(tmp_path):
    shard = files_shard(tmp_path, [10] * 40)
    opened_before = len(os.listdir("/proc/self/fd"))
    most_open = 0
    for _ in sources._local_files(shard, sources.ReadOptions()):
        most_open = max(most_open, len(os.listdir("/proc/self/fd")) - opened_before)
    assert 1 < most_open <= sources.READ_AHEAD_FILES + 1
    assert len(os.listdir("/proc/self/fd")) == opened_before

    # Stopped early (a failed bundle), it closes its files itself: no "unclosed file".
    stopped_early = sources._local_files(shard, sources.ReadOptions())
    next(stopped_early)
    assert len(os.listdir("/proc/self/fd")) > opened_before
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        stopped_early.close()
    assert not [warning for warning in caught if issubclass(warning.category, ResourceWarning)]
    assert len(os.listdir("/proc/self/fd")) == opened_before


def test_faults_that_pass_are_retried_and_those_that_stay_stop_the_shard():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("503 slow down")
        return b"bytes"

    assert sources.with_retries(flaky, "gs://b/x.jpg", (0.0, 0.0)) == b"bytes" and len(calls) == 3

    def denied():
        raise PermissionError("403 Forbidden")

    with pytest.raises(sources.ShardUnreadable, match="cannot read gs://b/y.jpg: PermissionError: 403"):
        sources.with_retries(denied, "gs://b/y.jpg", (0.0, 0.0))

    def gone():
        raise FileNotFoundError("no such object")

    with pytest.raises(ImageError) as missing:
        sources.with_retries(gone, "gs://b/z.jpg", (0.0, 0.0))
    assert missing.value.reason == sources.NOT_FOUND


def img2dataset_sample(key: str, data: bytes, caption: str) -> dict[str, bytes]:
    fields = {"key": key, "url": f"https://example.com/{key}.jpg", "caption": caption, "status": "success"}
    return {"jpg": data, "txt": caption.encode(), "json": json.dumps(fields).encode()}


def test_webdataset_parquet_and_tfrecord_shards_carry_their_metadata(tmp_path):
    import tensorflow as tf

    tar_path = tmp_path / "00000.tar"
    with tarfile.open(tar_path, "w") as archive:
        for number in range(3):
            for extension, payload in img2dataset_sample(
                f"{number:09d}", b"image%d" % number, f"cap {number}"
            ).items():
                info = tarfile.TarInfo(f"{number:09d}.{extension}")
                info.size = len(payload)
                archive.addfile(info, io.BytesIO(payload))
    pq.write_table(
        pa.table({"key": ["a", "b"], "url": ["u/a", "u/b"], "caption": ["x", "y"], "jpg": [b"ia", b"ib"]}),
        tmp_path / "images.parquet",
    )
    with tf.io.TFRecordWriter(str(tmp_path / "images.tfrecord")) as writer:
        feature = {
            "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"it"])),
            "caption": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"a cat"])),
            "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[282])),
        }
        writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    every = sources.ReadOptions(metadata_fields=("*",))

    def read(kind, name, options=NO_PAUSES):
        shard = InputShard(kind, (str(tmp_path / name),), (1,))
        return list(sources.read_shard(shard, options, None))

    tar = read("webdataset", "00000.tar")
    assert [record.data for record in tar] == [b"image0", b"image1", b"image2"]
    assert tar[1].uri == f"{tmp_path}/00000.tar#000000001.jpg"
    assert tar[1].metadata == {
        "key": "000000001",
        "url": "https://example.com/000000001.jpg",
        "caption": "cap 1",
    }
    parquet = read("parquet", "images.parquet")
    assert [(record.uri.rsplit("#")[1], record.data, record.metadata["caption"]) for record in parquet] == [
        ("0", b"ia", "x"),
        ("1", b"ib", "y"),
    ]
    (tfrecord,) = read("tfrecord", "images.tfrecord", every)
    assert tfrecord.data == b"it" and tfrecord.metadata == {"caption": "a cat", "label": 282}
    assert read("webdataset", "00000.tar", sources.ReadOptions(metadata_fields=()))[0].metadata is None


def test_img2dataset_side_files_are_not_inputs_and_sidecars_become_metadata(tmp_path):
    (tmp_path / "00000.tar").write_bytes(b"")
    (tmp_path / "00000.parquet").write_bytes(b"")  # the tar's metadata, img2dataset's layout
    (tmp_path / "00000_stats.json").write_text("{}")
    files = tmp_path / "files"
    files.mkdir()
    (files / "000000001.jpg").write_bytes(b"x")
    (files / "000000001.json").write_text(json.dumps({"key": "000000001", "caption": "from json"}))
    (files / "000000001.txt").write_text("from txt")
    (files / "notes.txt").write_text("not beside an image: an input, which will fail as one")
    shards = plan_shards([str(tmp_path)], InputFormat.AUTO, files_per_shard=10)
    assert sorted((shard.kind, os.path.basename(shard.paths[0])) for shard in shards) == [
        ("files", "000000001.jpg"),
        ("webdataset", "00000.tar"),
    ]
    (images,) = [shard for shard in shards if shard.kind == "files"]
    assert [os.path.basename(path) for path in images.paths] == ["000000001.jpg", "notes.txt"]
    (record, _) = sources.read_shard(images, NO_PAUSES, None)
    assert record.metadata == {"key": "000000001", "caption": "from json"}


def test_a_metadata_file_that_cannot_be_found_makes_its_image_an_error_row(tmp_path):
    (tmp_path / "1.jpg").write_bytes(b"x")
    (tmp_path / "1.json").symlink_to(tmp_path / "moved.json")
    (tmp_path / "2.jpg").write_bytes(b"y")
    (images,) = plan_shards([str(tmp_path)], InputFormat.AUTO, files_per_shard=10)
    assert images.sidecars == ((str(tmp_path / "1.json"),), ())
    first, second = sources.read_shard(images, NO_PAUSES, None)
    assert (first.data.reason, first.data.message) == (
        sources.NOT_FOUND,
        f"its metadata file: {tmp_path}/1.json is a symbolic link to nothing (-> {tmp_path}/moved.json)",
    )
    assert second.data == b"y"


def write_containers(folder, count: int) -> dict[str, str]:
    """A TFRecord, a WebDataset tar and a Parquet file of ``count`` records each."""
    import tensorflow as tf

    from fixtures.images import jpeg_bytes

    images = [jpeg_bytes(seed, 64, 48) for seed in range(count)]
    with tf.io.TFRecordWriter(str(folder / "c.tfrecord")) as writer:
        for data in images:
            feature = {"image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[data]))}
            writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    with tarfile.open(folder / "c.tar", "w") as archive:
        for number, data in enumerate(images):
            info = tarfile.TarInfo(f"{number:05d}.jpg")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    pq.write_table(pa.table({"jpg": images}), folder / "c.parquet", row_group_size=10)
    return {"tfrecord": "c.tfrecord", "webdataset": "c.tar", "parquet": "c.parquet"}


@pytest.mark.parametrize("kind", ["tfrecord", "webdataset", "parquet"])
def test_a_read_fault_in_the_middle_of_a_container_is_read_again_and_every_record_arrives(tmp_path, kind):
    from tests.filesystems import CutFileSystem

    name = write_containers(tmp_path, 60)[kind]
    whole = list(sources.read_shard(InputShard(kind, (str(tmp_path / name),), (1,)), NO_PAUSES, None))
    cut = f"{CutFileSystem.SCHEME}://{tmp_path}/{name}"
    records = list(sources.read_shard(InputShard(kind, (cut,), (1,)), NO_PAUSES, None))
    assert cut in CutFileSystem.cut  # the first read did fail half way
    assert len(records) == len(whole) == 60
    assert [record.data for record in records] == [record.data for record in whole]
    assert [record.uri.removeprefix("cut://") for record in records] == [record.uri for record in whole]

    broken = tmp_path / f"broken-{name}"
    broken.write_bytes((tmp_path / name).read_bytes())
    shard = InputShard(kind, (f"{CutFileSystem.SCHEME}://{broken}",), (1,))
    with pytest.raises(sources.ShardUnreadable, match="ConnectionResetError"):
        list(sources.read_shard(shard, NO_PAUSES, None))


def test_a_container_deleted_since_it_was_listed_is_one_not_found_row(tmp_path):
    (record,) = sources.read_shard(
        InputShard("webdataset", (str(tmp_path / "gone.tar"),), (1,)), NO_PAUSES, None
    )
    assert isinstance(record.data, ImageError) and record.data.reason == sources.NOT_FOUND

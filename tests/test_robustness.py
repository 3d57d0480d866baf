"""Nothing lost: a corpus of bad inputs, crashes and reruns, every shard format, and
the pieces Dataflow needs (an installable sdist, a job graph built offline)."""

from __future__ import annotations

import glob
import io
import json
import os
import pathlib
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tifffile
from PIL import Image

from fixtures.images import (
    encode,
    jpeg_claiming_size,
    photo_like,
    png_claiming_size,
    truncated_jpeg,
    ycck_jpeg,
)
from imgembed.common.embedding_files import embeddings_glob, errors_glob
from imgembed.models.registry import EMBEDDED_MODEL_NAME
from imgembed.pipelines import embed
from imgembed.transforms import decode

BIN = os.path.dirname(sys.executable)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IN_PROCESS = ["--runner=DirectRunner"]
ROW = "row"
EXIF_ORIENTATION = 0x0112
MAX_FILE_BYTES = 400_000


def with_exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    return encode(photo_like(orientation, 90, 60), "JPEG", exif=exif)


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (20, 20), colour) for colour in [(255, 0, 0), (0, 0, 255)]]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buffer.getvalue()


def multipage_tiff() -> bytes:
    pages = [photo_like(seed, 40, 30) for seed in range(3)]
    buffer = io.BytesIO()
    pages[0].save(buffer, "TIFF", save_all=True, append_images=pages[1:])
    return buffer.getvalue()


def float_tiff() -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(
        buffer, np.random.default_rng(0).random((3, 20, 30)), photometric="rgb", planarconfig="separate"
    )
    return buffer.getvalue()


def palette_with_transparency() -> bytes:
    image = Image.new("P", (30, 30), 1)
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.putpixel((3, 3), 0)
    return encode(image, "PNG", transparency=1)


def bad_png_crc() -> bytes:
    png = bytearray(encode(photo_like(3, 40, 40), "PNG"))
    idat = png.index(b"IDAT")
    crc_at = idat + 4 + int.from_bytes(png[idat - 4 : idat], "big")
    png[crc_at] ^= 0xFF
    return bytes(png)


def damaged_jpeg() -> bytes:
    data = bytearray(encode(photo_like(4, 300, 200), "JPEG"))
    middle = len(data) // 2
    data[middle : middle + 300] = b"\xff" * 300
    return bytes(data)


def over_the_byte_cap() -> bytes:
    noise = np.random.default_rng(1).integers(0, 256, (400, 400, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), "PNG")
    assert len(data) > MAX_FILE_BYTES
    return data


def bad_inputs() -> dict[str, tuple[bytes, str]]:
    """file name -> (bytes, the expected outcome: a row, or the error reason)."""
    cases = {
        "zero_bytes.jpg": (b"", decode.EMPTY_FILE),
        "truncated.jpg": (truncated_jpeg(1), decode.TRUNCATED),
        "truncated.png": (encode(photo_like(2, 300, 200), "PNG")[:5000], decode.TRUNCATED),
        "bad_crc.png": (bad_png_crc(), decode.CORRUPT),
        "damaged.jpg": (damaged_jpeg(), decode.CORRUPT),
        "text_named.jpg": (b"these are not the pixels you are looking for", decode.NOT_AN_IMAGE),
        "html_named.jpg": (b"<!DOCTYPE html><html><body>403 Forbidden</body></html>", decode.NOT_AN_IMAGE),
        "vector.svg": (
            b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>',
            decode.UNSUPPORTED_FORMAT,
        ),
        "document.pdf": (b"%PDF-1.7\n%...", decode.UNSUPPORTED_FORMAT),
        "bomb.png": (png_claiming_size(60_000, 60_000), decode.TOO_MANY_PIXELS),
        "bomb.jpg": (jpeg_claiming_size(50_000, 40_000), decode.TOO_MANY_PIXELS),
        "too_big.png": (over_the_byte_cap(), decode.FILE_TOO_LARGE),
        "cmyk.jpg": (encode(Image.new("CMYK", (30, 20), (0, 120, 200, 20)), "JPEG"), ROW),
        "ycck.jpg": (ycck_jpeg(), ROW),
        "sixteen_bit.png": (encode(Image.fromarray(np.full((20, 30), 40000, np.uint16)), "PNG"), ROW),
        "grayscale.jpg": (encode(photo_like(5, 60, 40).convert("L"), "JPEG"), ROW),
        "palette_transparent.png": (palette_with_transparency(), ROW),
        "rgba.png": (encode(photo_like(6, 50, 40).convert("RGBA"), "PNG"), ROW),
        "animated.gif": (animated_gif(), ROW),
        "photo.webp": (encode(photo_like(7, 80, 60), "WEBP"), ROW),
        "photo.bmp": (encode(photo_like(8, 80, 60), "BMP"), ROW),
        "multipage.tif": (multipage_tiff(), ROW),
        "float_planar.tif": (float_tiff(), ROW),
        "one_pixel.png": (encode(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"), ROW),
        "ten_thousand_by_one.png": (encode(Image.new("RGB", (10_000, 1), (9, 9, 9)), "PNG"), ROW),
    }
    cases |= {f"exif_orientation_{n}.jpg": (with_exif(n), ROW) for n in range(1, 9)}
    return cases


def test_the_bad_input_corpus_loses_nothing_and_names_every_reason(tiny_model_dir, tmp_path):
    cases = bad_inputs()
    assert len(cases) >= 20
    folder = tmp_path / "dirty"
    folder.mkdir()
    for name, (data, _) in cases.items():
        (folder / name).write_bytes(data)
    output = tmp_path / "out"
    completed = subprocess.run(
        [
            os.path.join(BIN, "imgembed"),
            "embed",
            f"--input={folder}",
            f"--output={output}",
            f"--model={tiny_model_dir}",
        ]
        + [f"--max-file-bytes={MAX_FILE_BYTES}", "--files-per-shard=7"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]  # no crash on the multi-process runner

    rows = pa.concat_tables(
        pq.read_table(p) for p in glob.glob(embeddings_glob(os.path.join(str(output), "tiny_mobilenet_64")))
    )
    errors = pa.concat_tables(pq.read_table(p) for p in glob.glob(errors_glob(str(output))))
    outcome = {os.path.basename(uri): ROW for uri in rows["uri"].to_pylist()}
    outcome |= {os.path.basename(e["uri"]): e["reason"] for e in errors.to_pylist()}
    assert outcome == {name: expected for name, (_, expected) in cases.items()}
    assert len(rows) + len(errors) == len(cases)
    ids = rows["id"].to_pylist() + errors["id"].to_pylist()
    assert len(ids) == len(set(ids))
    summary = json.loads((output / "run_summary.json").read_text())
    assert summary["inputs"] == len(cases) and summary["balanced"]
    for marker in glob.glob(str(output / "_shards" / "*.json")):  # per shard, too
        shard = json.loads(pathlib.Path(marker).read_text())
        assert shard["inputs"] == shard["rows"]["tiny_mobilenet_64"] + shard["input_errors"]


def test_a_decompression_bomb_is_refused_within_a_gigabyte(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_claiming_size(60_000, 60_000))  # 3.6 gigapixels, 10.8 GB as RGB
    script = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))\n"
        "from transforms.decode import DecodeLimits, ImageError, decode_image\n"
        "try:\n"
        "    decode_image(open(sys.argv[1], 'rb').read(), DecodeLimits())\n"
        "except ImageError as error:\n"
        "    print(error.reason)\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", script, str(bomb)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env=os.environ | {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"},
    )
    assert completed.stdout.strip() == decode.TOO_MANY_PIXELS, completed.stderr[-2000:]


def markers_in(output) -> dict[str, float]:
    """Each committed shard's marker, with the time it was written."""
    return {path: os.path.getmtime(path) for path in glob.glob(str(output / "_shards" / "*.json"))}


@pytest.mark.slow
def test_a_job_killed_at_60_percent_keeps_its_finished_shards_and_the_rerun_does_only_the_rest(tmp_path):
    # 1500 photos in 60 shards, with the real default model: the work, not the start-up,
    # takes most of the run, so 60% of the time is well past a third of the shards.
    folder = tmp_path / "photos"
    folder.mkdir()
    distinct = [encode(photo_like(seed, 256, 192), "JPEG", quality=90) for seed in range(100)]
    for number in range(1500):
        (folder / f"{number:04d}.jpg").write_bytes(distinct[number % 100])
    command = [os.path.join(BIN, "imgembed"), "embed", f"--input={folder}", "--files-per-shard=25"]

    started = time.monotonic()
    complete = subprocess.run(
        command + [f"--output={tmp_path / 'complete'}"], capture_output=True, timeout=900
    )
    assert complete.returncode == 0, complete.stderr[-3000:]
    whole_run = time.monotonic() - started

    output = tmp_path / "killed"
    process = subprocess.Popen(
        command + [f"--output={output}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    time.sleep(0.6 * whole_run)
    assert process.poll() is None, "the run ended before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)  # the launcher and its workers, as a crash would
    process.wait()
    committed = markers_in(output)
    assert 60 // 3 <= len(committed) < 60, (len(committed), whole_run)

    rerun = subprocess.run(command + [f"--output={output}"], capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads((output / "run_summary.json").read_text())
    assert (summary["shards"], summary["run"]["shards_kept"]) == (60, len(committed))
    assert {path: markers_in(output)[path] for path in committed} == committed  # done shards untouched
    table = pa.concat_tables(
        pq.read_table(p) for p in glob.glob(embeddings_glob(os.path.join(output, EMBEDDED_MODEL_NAME)))
    )
    uris = table["uri"].to_pylist()
    assert len(uris) == len(set(uris)) == 1500 and summary["inputs"] == 1500 and summary["balanced"]
    assert not glob.glob(str(output / "**" / ".tmp-*"), recursive=True)  # the killed writes are cleaned up


def test_reruns_give_byte_identical_embeddings(photo_dir, tiny_model_dir, tmp_path):
    runs = []
    for number in range(2):
        output = tmp_path / f"run{number}"
        embed.run([f"--input={photo_dir}", f"--output={output}", f"--model={tiny_model_dir}"] + IN_PROCESS)
        table = pa.concat_tables(
            pq.read_table(p)
            for p in sorted(glob.glob(embeddings_glob(os.path.join(str(output), "tiny_mobilenet_64"))))
        )
        runs.append(table.sort_by("id"))
    first, second = runs
    assert first["id"].to_pylist() == second["id"].to_pylist()
    assert np.stack(first["embedding"].to_numpy(zero_copy_only=False)).tobytes() == (
        np.stack(second["embedding"].to_numpy(zero_copy_only=False)).tobytes()
    )


def write_shard_formats(images: dict[str, bytes], folder) -> dict[str, str]:
    """The same images as loose files, a TFRecord, a WebDataset tar and a Parquet file."""
    import tensorflow as tf

    (folder / "files").mkdir(parents=True)
    for name, data in images.items():
        (folder / "files" / name).write_bytes(data)
    with tf.io.TFRecordWriter(str(folder / "images.tfrecord")) as writer:
        for name, data in images.items():
            feature = {
                "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[data])),
                "image/filename": tf.train.Feature(bytes_list=tf.train.BytesList(value=[name.encode()])),
            }
            writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    with tarfile.open(folder / "images.tar", "w") as archive:
        for number, (name, data) in enumerate(images.items()):
            for suffix, payload in ((".jpg", data), (".json", json.dumps({"name": name}).encode())):
                info = tarfile.TarInfo(f"{number:06d}{suffix}")
                info.size = len(payload)
                archive.addfile(info, io.BytesIO(payload))
    pq.write_table(
        pa.table({"key": list(images), "jpg": list(images.values()), "caption": ["a photo"] * len(images)}),
        folder / "images.parquet",
    )
    return {
        "files": str(folder / "files"),
        "tfrecord": str(folder / "images.tfrecord"),
        "webdataset": str(folder / "images.tar"),
        "parquet": str(folder / "images.parquet"),
    }


def test_the_same_corpus_in_every_shard_format_gives_the_same_embeddings(tiny_model_dir, tmp_path):
    images = {f"{seed}.jpg": encode(photo_like(seed, 200, 150), "JPEG", quality=90) for seed in range(8)}
    sources = write_shard_formats(images, tmp_path / "inputs")
    by_format = {}
    for name, source in sources.items():
        output = tmp_path / name
        summary = embed.run(
            [f"--input={source}", f"--output={output}", f"--model={tiny_model_dir}"] + IN_PROCESS
        )
        assert summary.models[0].rows == 8 and summary.balanced, name
        table = pa.concat_tables(
            pq.read_table(p)
            for p in glob.glob(embeddings_glob(os.path.join(str(output), "tiny_mobilenet_64")))
        )
        by_format[name] = {row["sha256"]: np.asarray(row["embedding"]) for row in table.to_pylist()}
    reference = by_format["files"]
    for name, vectors in by_format.items():
        assert vectors.keys() == reference.keys(), name
        for sha, vector in vectors.items():
            np.testing.assert_array_equal(vector, reference[sha], err_msg=name)
    uris = pa.concat_tables(
        pq.read_table(p)
        for p in glob.glob(embeddings_glob(os.path.join(str(tmp_path / "webdataset"), "tiny_mobilenet_64")))
    )["uri"].to_pylist()
    assert all(uri.startswith(sources["webdataset"] + "#") and uri.endswith(".jpg") for uri in uris)


def test_broken_containers_become_error_rows(tiny_model_dir, tmp_path):
    good = tmp_path / "inputs"
    sources = write_shard_formats({"a.jpg": encode(photo_like(1, 80, 60), "JPEG")}, good)
    cut = tmp_path / "cut.tfrecord"
    data = pathlib.Path(sources["tfrecord"]).read_bytes()
    cut.write_bytes(data + data[: len(data) // 2])  # a second record cut short
    (tmp_path / "junk.tar").write_bytes(b"not a tar archive at all" * 40)
    summary = embed.run(
        [
            f"--input={cut}",
            f"--input={tmp_path}/junk.tar",
            f"--output={tmp_path}/out",
            f"--model={tiny_model_dir}",
        ]
        + IN_PROCESS
    )
    assert summary.models[0].rows == 1 and summary.balanced
    assert summary.errors_by_reason == {"corrupt_container": 2}


def test_the_sdist_installs_and_runs_in_a_fresh_virtualenv(tmp_path, photo_dir):
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(dist), REPO],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (sdist,) = dist.glob("imgembed-*.tar.gz")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    installed = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "-c", os.path.join(REPO, "constraints.txt"), str(sdist)],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert installed.returncode == 0, installed.stderr[-3000:]
    completed = subprocess.run(
        [str(venv / "bin" / "imgembed"), "embed", f"--input={photo_dir}", f"--output={tmp_path}/out"],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,  # not the repo: only the installed package may be used
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "inputs 6 = embedded 6 + errors 0" in completed.stdout

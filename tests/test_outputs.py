"""The shard writer on its own: parts joined into one sorted file, accounting, retries."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imgembed.common.embedding_files import STAGE_DECODE, embedding_schema, image_id, read_metadata
from imgembed.pipelines import outputs
from imgembed.pipelines.records import ImageKey, embedding_row, error_row

SCHEMA = embedding_schema(4, {"model": "test"})
KEY = "shard0"


def row(name: str) -> dict:
    uri = f"/photos/{name}.jpg"
    return embedding_row(ImageKey(image_id(uri), uri, 10, 10, "0" * 64), np.full(4, len(name), np.float32))


def write_parts(output_dir: str, rows: list[dict], rows_per_part: int) -> list[dict]:
    """Runs WriteParts over one bundle; returns the parts it announced."""
    writer = outputs.WriteParts(output_dir, "m", SCHEMA, rows_per_part)
    writer.start_bundle()
    announced = [part for element in rows for part in writer.process((KEY, element))]
    announced += [windowed.value for windowed in writer.finish_bundle()]
    assert all(key == KEY for key, _ in announced)
    return [part for _, part in announced]


def shard_writer(output_dir: str) -> outputs.WriteShard:
    return outputs.WriteShard(output_dir, {"m": SCHEMA}, {"settings": 1}, "settings-key")


def test_parts_are_joined_into_one_file_sorted_by_uri_and_removed(tmp_path):
    names = ["e", "a", "d", "c", "b"]
    parts = write_parts(str(tmp_path), [row(name) for name in names], rows_per_part=2)
    assert [part["rows"] for part in parts] == [2, 2, 1]  # written as they fill, the rest at the end
    failed = error_row("/photos/zz.jpg", STAGE_DECODE, "truncated", "cut short")

    written = list(
        shard_writer(str(tmp_path)).process((KEY, {"counts": [4, 2], "errors": [failed], "parts": parts}))
    )

    assert written == [KEY]
    table = pq.read_table(outputs.embeddings_path(str(tmp_path), "m", KEY))
    assert table["uri"].to_pylist() == [f"/photos/{name}.jpg" for name in sorted(names)]
    assert table.schema.names == SCHEMA.names and read_metadata(table.schema) == {"model": "test"}
    marker = json.loads(pathlib.Path(outputs.marker_path(str(tmp_path), KEY)).read_text())
    assert marker["inputs"] == 6 and marker["rows"] == {"m": 5} and marker["input_errors"] == 1
    assert not (tmp_path / outputs.PARTS / KEY).exists()


def test_interleaved_shards_get_whole_parts_while_held_rows_stay_bounded(tmp_path):
    """Pieces of many shards arrive mixed: each shard's rows are written when it has
    a part's worth, and all of them once the rows held reach the byte bound."""
    rows = [(f"shard{number % 4}", row(f"{number:03d}")) for number in range(40)]

    def run(max_held_rows: int) -> tuple[list[dict], int]:
        writer = outputs.WriteParts(
            str(tmp_path), "m", SCHEMA, rows_per_part=3, max_held_bytes=max_held_rows * row_bytes
        )
        writer.start_bundle()
        parts, most_held = [], 0
        for done, element in enumerate(rows, 1):
            parts += [part for _, part in writer.process(element)]
            most_held = max(most_held, done - sum(part["rows"] for part in parts))
        parts += [windowed.value[1] for windowed in writer.finish_bundle()]
        assert sum(part["rows"] for part in parts) == len(rows)
        return parts, most_held

    row_bytes = outputs._row_bytes(rows[0][1])
    parts, most_held = run(max_held_rows=1000)
    assert [part["rows"] for part in parts] == [3] * 12 + [1] * 4  # 10 rows a shard
    assert most_held == 4 * 2  # at most 2 rows a shard wait for their part
    parts, most_held = run(max_held_rows=6)
    assert most_held < 6  # reaching 6 rows of bytes wrote them all


def test_a_shard_whose_rows_and_errors_miss_an_input_is_not_written(tmp_path):
    parts = write_parts(str(tmp_path), [row("a"), row("b")], rows_per_part=10)
    with pytest.raises(outputs.AccountingError, match="3 inputs but 2 rows"):
        list(shard_writer(str(tmp_path)).process((KEY, {"counts": [3], "errors": [], "parts": parts})))
    assert not (tmp_path / outputs.MARKERS).exists()


def test_a_part_announced_twice_is_refused_as_duplicate_ids(tmp_path):
    (part,) = write_parts(str(tmp_path), [row("a")], rows_per_part=10)
    with pytest.raises(outputs.AccountingError, match="1 duplicate ids"):
        list(
            shard_writer(str(tmp_path)).process(
                (KEY, {"counts": [1, 1], "errors": [], "parts": [part, part]})
            )
        )


def test_a_retried_writer_of_a_complete_shard_only_cleans_up(tmp_path):
    parts = write_parts(str(tmp_path), [row("a")], rows_per_part=10)
    groups = {"counts": [1], "errors": [], "parts": parts}
    list(shard_writer(str(tmp_path)).process((KEY, groups)))
    first = pathlib.Path(outputs.embeddings_path(str(tmp_path), "m", KEY)).read_bytes()
    # The parts are gone now; a retry must not need them.
    assert list(shard_writer(str(tmp_path)).process((KEY, groups))) == [KEY]
    assert pathlib.Path(outputs.embeddings_path(str(tmp_path), "m", KEY)).read_bytes() == first


def test_vectors_are_stored_without_dictionary_encoding_and_ids_with_it():
    """Dictionary encoding makes float vectors slower to write and bigger; it suits ids."""
    table = outputs.rows_table([row(name) for name in ("a", "bb", "ccc")], SCHEMA)
    metadata = pq.ParquetFile(pa.BufferReader(outputs.parquet_bytes(table))).metadata.row_group(0)
    encodings = {
        metadata.column(index).path_in_schema.split(".")[0]: set(metadata.column(index).encodings)
        for index in range(metadata.num_columns)
    }
    assert not {"PLAIN_DICTIONARY", "RLE_DICTIONARY"} & encodings["embedding"]
    assert {"PLAIN_DICTIONARY", "RLE_DICTIONARY"} & encodings["uri"]

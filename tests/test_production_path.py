"""The production path, proven from outside: inputs, outputs, models and temp on a
real GCS-protocol server; workers that cannot see the launcher's disk; kills,
injected faults, and a job graph that does not grow with the inputs."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from fixtures import tiny_models
from fixtures.images import photo_like
from imgembed.common import storage
from imgembed.common.embedding_files import embeddings_glob, errors_glob
from imgembed.pipelines import embed
from tests.beam_workers import can_isolate, isolated_workers


def upload_photos(url: str, count: int, seed: int = 0) -> dict[str, bytes]:
    """``count`` JPEGs written to ``url`` through Beam's FileSystems; name -> bytes."""
    photos = {}
    for number in range(count):
        buffer = io.BytesIO()
        photo_like(seed + number, 120, 90).save(buffer, "JPEG", quality=90)
        photos[f"{number:03d}.jpg"] = buffer.getvalue()
        storage.write_bytes(storage.join(url, f"{number:03d}.jpg"), buffer.getvalue())
    return photos


def read_tables(pattern: str):
    import pyarrow as pa

    return pa.concat_tables(
        pq.read_table(io.BytesIO(storage.read_bytes(path))) for path in storage.list_files(pattern)
    )


def test_workers_that_share_nothing_with_the_launcher_embed_from_and_to_object_storage(gcs, tmp_path):
    why_not = can_isolate()
    if why_not and not os.environ.get("IMGEMBED_REQUIRE_TOOLS"):
        pytest.skip(why_not)
    inputs, output = gcs.url("isolated", "in"), gcs.url("isolated", "out")
    photos = upload_photos(inputs, 7)
    # A model file on the launcher's disk (pytest's tmp_path is under /tmp, which the
    # workers do not see): it must reach them through the output folder.
    model = tiny_models.save_tflite(str(tmp_path / "launcher_only.tflite"))
    with isolated_workers(gcs.env, gcs.credentials_json) as runner:
        summary = embed.run(
            [f"--input={inputs}/*", f"--output={output}", f"--model={model}", "--files-per-shard=3"] + runner
        )
    assert summary.balanced and summary.inputs == 7 and summary.models[0].rows == 7
    table = read_tables(embeddings_glob(storage.join(output, "launcher_only")))
    assert sorted(uri.rsplit("/", 1)[-1] for uri in table["uri"].to_pylist()) == sorted(photos)
    assert table.schema.field("embedding").type.list_size == 256
    assert len(read_tables(errors_glob(output))) == 0
    marker_files = storage.list_files(storage.join(output, "_shards", "*.json"))
    assert len(marker_files) == 3
    assert json.loads(storage.read_bytes(storage.join(output, "run_summary.json")))["balanced"]
    assert np.isfinite(np.stack(table["embedding"].to_numpy(zero_copy_only=False))).all()

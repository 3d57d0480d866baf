"""Distributed add on Beam: each embedding file is added to its own empty copy of
the trained index on some worker, and the launcher merges the shards in id order.

The trained index and the shards travel through Beam's FileSystems, so the same
code runs on the local multi-process runner and on Dataflow (with a gs:// temp
location). Only IVF indexes are built this way: HNSW graphs cannot be merged,
and Flat and HNSW are only chosen for corpora that one machine handles.

    add = functools.partial(add_with_beam, pipeline_args=["--runner=DataflowRunner", ...])
    build(source, index_dir, config, add=add)
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import uuid

import apache_beam as beam
import faiss
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions

from imgembed.common import storage
from imgembed.index.build import add_locally
from imgembed.index.faiss_index import add_vectors, is_ivf, merge_shard
from imgembed.index.reader import EmbeddingFile, EmbeddingSource
from imgembed.index.vectors import Metric, prepare

_log = logging.getLogger(__name__)


def _write_index(index: faiss.Index, path: str) -> None:
    storage.write_bytes(path, faiss.serialize_index(index).tobytes())


def _read_index(path: str) -> faiss.Index:
    return faiss.deserialize_index(np.frombuffer(storage.read_bytes(path), dtype=np.uint8))


def shard_path(temp_dir: str, file: EmbeddingFile) -> str:
    return storage.join(temp_dir, f"shard-{file.first_id:015d}.faiss")


class AddFileToShard(beam.DoFn):
    """One embedding file -> an empty copy of the trained index holding its rows."""

    def __init__(self, empty_index_path: str, temp_dir: str, metric: Metric, transform_dir: str | None):
        self._empty_index_path = empty_index_path
        self._temp_dir = temp_dir
        self._metric = metric
        self._transform_dir = transform_dir
        self._vectors = Metrics.counter("imgembed_index", "vectors_added")

    def setup(self):
        self._empty = _read_index(self._empty_index_path)
        self._transform = None
        if self._transform_dir:
            from imgembed.transforms.embedding_transform import EmbeddingTransform

            self._transform = EmbeddingTransform(self._transform_dir)

    def process(self, file: EmbeddingFile):
        shard = faiss.clone_index(self._empty)
        source = EmbeddingSource.from_files([file]).with_transform(self._transform)
        for first_id, vectors in source.vector_batches():
            add_vectors(shard, prepare(vectors, self._metric, file.path), first_id, base_id=file.first_id)
        self._vectors.inc(shard.ntotal)
        _write_index(shard, shard_path(self._temp_dir, file))
        yield shard_path(self._temp_dir, file)


def add_with_beam(
    index: faiss.Index, source: EmbeddingSource, metric: Metric, pipeline_args: list[str] | None = None
) -> None:
    """Adds every row of ``source`` to the trained ``index`` (empty or not) with a Beam job.
    The trained index and the shards go through Beam's ``--temp_location`` when one is
    given (gs:// on Dataflow), else through a temporary folder of this machine (the
    local runner's workers share it)."""
    if not is_ivf(index):
        _log.warning(
            "%s indexes cannot be merged; adding in this process", type(faiss.downcast_index(index)).__name__
        )
        add_locally(index, source, metric)
        return
    options = PipelineOptions(pipeline_args or [])
    temp_location = options.view_as(GoogleCloudOptions).temp_location
    local_temp = None if temp_location else tempfile.mkdtemp(prefix="imgembed-index-")
    temp_dir = storage.join(temp_location or local_temp, f"imgembed-index-{uuid.uuid4().hex}")
    transform_dir = source.transform.directory if source.transform is not None else None
    empty = faiss.clone_index(index)
    empty.reset()  # keeps the training, drops any rows an incremental add starts from
    empty_path = storage.join(temp_dir, "trained-empty.faiss")
    storage.ensure_folder(temp_dir)
    _write_index(empty, empty_path)
    with beam.Pipeline(options=options) as pipeline:
        _ = (
            pipeline
            | "Files" >> beam.Create(source.files)
            | "Spread" >> beam.Reshuffle()
            | "AddToShards" >> beam.ParDo(AddFileToShard(empty_path, temp_dir, metric, transform_dir))
        )
    for file in source.files:  # id order: refine codes are positional
        merge_shard(index, _read_index(shard_path(temp_dir, file)))
    storage.delete_folder(temp_dir)
    if local_temp:
        shutil.rmtree(local_temp, ignore_errors=True)

"""Distributed add on Beam: each embedding file is added to its own empty copy of
the trained index on some worker, and the launcher merges the shards in id order:
into inverted lists on disk (``index.ivfdata``) for IVF,Flat and IVF,SQ8, so the
merged index need not fit in its RAM; in memory for the compact PQ kinds, whose
raw re-ranking vectors go to disk instead.

The trained index and the shards travel through Beam's FileSystems, so the same
code runs on the local multi-process runner and on Dataflow (with a gs:// temp
location). Only IVF indexes are built this way: HNSW graphs cannot be merged,
and Flat and HNSW are only chosen for corpora that one machine handles.

    add = functools.partial(add_with_beam, pipeline_args=["--runner=DataflowRunner", ...])
    build(source, index_dir, config, add=add)
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid

import apache_beam as beam
import faiss
import faiss.contrib.ondisk
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions

from imgembed.common import storage
from imgembed.common.runners import close_client, local_workers, spread_over, warn_of_stalling_dask_workers
from imgembed.index import store
from imgembed.index.build import add_locally
from imgembed.index.faiss_index import (
    add_vectors,
    can_have_on_disk_lists,
    empty_copy,
    exact_assignment,
    is_ivf,
    merge_shard,
    native_stdout_silenced,
)
from imgembed.index.reader import EmbeddingFile, EmbeddingSource
from imgembed.index.refine_file import RefineVectors
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
        with exact_assignment(shard):
            for first_id, vectors in source.vector_batches():
                add_vectors(shard, prepare(vectors, self._metric, file.path), first_id, base_id=file.first_id)
        self._vectors.inc(shard.ntotal)
        _write_index(shard, shard_path(self._temp_dir, file))
        yield shard_path(self._temp_dir, file)


def merge_on_disk(index: faiss.Index, shards: list[str], lists_path: str) -> None:
    """Merges the shards' inverted lists into one file on disk (faiss
    OnDiskInvertedLists), read a shard at a time through memory maps, so the merged
    index never has to fit in this machine's RAM; ``index`` (trained, empty) then
    points at ``lists_path``."""
    with tempfile.TemporaryDirectory(prefix="imgembed-shards-") as local:
        names = []
        for number, shard in enumerate(shards):
            if storage.is_local(shard):
                names.append(shard)
            else:  # faiss maps files of this machine: one shard (one embedding file) at a time
                names.append(os.path.join(local, f"shard-{number}.faiss"))
                with open(names[-1], "wb") as copy:
                    copy.write(storage.read_bytes(shard))
        with native_stdout_silenced():
            faiss.contrib.ondisk.merge_ondisk(index, names, lists_path)


def add_with_beam(
    index: faiss.Index,
    source: EmbeddingSource,
    metric: Metric,
    refine: RefineVectors | None = None,
    folder: str | None = None,
    pipeline_args: list[str] | None = None,
) -> None:
    """Adds every row of ``source`` to the trained ``index`` (empty or not) with a Beam job.
    The trained index and the shards go through Beam's ``--temp_location`` when one is
    given (gs:// on Dataflow), else through a temporary folder of this machine (the
    local runner's workers share it)."""
    if not is_ivf(index):
        _log.warning(
            "%s indexes cannot be merged; adding in this process", type(faiss.downcast_index(index)).__name__
        )
        add_locally(index, source, metric, refine, folder)
        return
    args = spread_over(list(pipeline_args or []), len(source.files))
    warn_of_stalling_dask_workers(args)
    options = PipelineOptions(args)
    temp_location = options.view_as(GoogleCloudOptions).temp_location
    if temp_location is None and local_workers(options) is None:
        raise ValueError(
            "--distributed on a cluster needs Beam's --temp_location where its workers and this "
            "machine both reach (e.g. gs://bucket/tmp): the trained index and the shards pass through it"
        )
    local_temp = None if temp_location else tempfile.mkdtemp(prefix="imgembed-index-")
    temp_dir = storage.join(temp_location or local_temp, f"imgembed-index-{uuid.uuid4().hex}")
    empty = empty_copy(index)
    empty_path = storage.join(temp_dir, "trained-empty.faiss")
    storage.ensure_folder(temp_dir)
    _write_index(empty, empty_path)
    transform_dir = None
    if source.transform is not None:  # its graph may be on this machine only (an index version's copy)
        transform_dir = storage.join(temp_dir, "transform")
        storage.copy_tree(source.transform.directory, transform_dir)
    pipeline = beam.Pipeline(options=options)
    _ = (
        pipeline
        | "Files" >> beam.Create(source.files)
        | "Spread" >> beam.Reshuffle()
        | "AddToShards" >> beam.ParDo(AddFileToShard(empty_path, temp_dir, metric, transform_dir))
    )
    result = pipeline.run()
    try:
        result.wait_until_finish()
    finally:
        close_client(result)
    shards = [shard_path(temp_dir, file) for file in source.files]  # id order: refine codes are positional
    if folder is not None and index.ntotal == 0 and can_have_on_disk_lists(index):
        merge_on_disk(index, shards, os.path.join(folder, store.ON_DISK_LISTS_FILE))
    else:
        for shard in shards:
            merge_shard(index, _read_index(shard), refine)
    storage.delete_folder(temp_dir)
    if local_temp:
        shutil.rmtree(local_temp, ignore_errors=True)

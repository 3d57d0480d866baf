"""Full-pass statistics over the embeddings (tf.Transform), applied the same way to
the corpus and to every query.

    x -> L2-normalise -> subtract the corpus mean -> [project on the top --dims
    principal components] -> [divide each component by its standard deviation]

``preprocessing_fn`` is the only definition: ``analyze`` runs it with
``tft_beam`` over the Parquet embeddings (Arrow RecordBatches, the TFXIO path) on
any Beam runner and writes the resulting graph (``transform_fn/`` and
``transformed_metadata/``); ``EmbeddingTransform`` loads that graph for the index
builder, the service and ``imgembed query``.

All statistics come from one pass: ``tft.mean``, ``tft.pca`` and
``tft.covariance`` all read the normalised vectors (PCA and covariance centre
internally), and the whitening scale of each component is ``v^T C v`` from their
outputs. (A pass that reads the output of another, e.g. a variance of the
projected vectors, would cost a pass each, and more than two such phases stall
Beam 2.77's FnApiRunner.)
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import uuid

import numpy as np
import pyarrow as pa

from imgembed.common import storage
from imgembed.common.local_copies import local_path
from imgembed.common.runners import DASK_RUNNER, local_workers

EMBEDDING = "embedding"
# A second output, the same for every row: the share of the corpus variance the
# kept components explain (1.0 without PCA). Read once by the report.
EXPLAINED_VARIANCE = "explained_variance"
# Whitening divides by the component's standard deviation; this keeps components
# with (numerically) no variance finite.
VARIANCE_FLOOR = 1e-10
# Written next to transform_fn/: what was asked for, and the input width.
OPTIONS_FILE = "imgembed_transform.json"


@dataclasses.dataclass(frozen=True)
class TransformOptions:
    """``dims``: PCA output size (None keeps every dimension); ``whiten``: unit
    variance per component (needs ``dims``)."""

    dims: int | None = None
    whiten: bool = False

    def __post_init__(self):
        if self.dims is not None and self.dims < 1:
            raise ValueError(f"--dims must be positive, got {self.dims}")
        if self.whiten and self.dims is None:
            raise ValueError("--whiten needs --dims (whitening is per principal component)")

    @property
    def folder_name(self) -> str:
        if self.dims is None:
            return "transform_center"
        return f"transform_pca{self.dims}" + ("_whiten" if self.whiten else "")

    def to_metadata(self) -> dict:
        return {"l2_normalise": True, "center": True, "pca_dims": self.dims, "whiten": self.whiten}


def preprocessing_fn_for(options: TransformOptions, input_dim: int):
    import tensorflow as tf
    import tensorflow_transform as tft

    if options.dims is not None and options.dims > input_dim:
        raise ValueError(f"--dims {options.dims} is more than the {input_dim} dimensions of the embeddings")

    def preprocessing_fn(inputs):
        vectors = tf.math.l2_normalize(inputs[EMBEDDING], axis=1)
        rows = tf.shape(vectors)[:1]
        centred = vectors - tft.mean(vectors, reduce_instance_dims=False, name="mean")
        if options.dims is None:
            return {EMBEDDING: centred, EXPLAINED_VARIANCE: tf.ones(rows)}
        components = tf.cast(
            tft.pca(vectors, output_dim=options.dims, dtype=tf.float64, name="pca"), tf.float32
        )
        covariance = tf.cast(tft.covariance(vectors, dtype=tf.float64, name="covariance"), tf.float32)
        # Variance along each kept component: v^T C v.
        variances = tf.reduce_sum(components * tf.matmul(covariance, components), axis=0)
        explained = tf.reduce_sum(variances) / tf.maximum(tf.linalg.trace(covariance), VARIANCE_FLOOR)
        projected = tf.matmul(centred, components)
        if options.whiten:
            projected = projected / tf.sqrt(tf.maximum(variances, VARIANCE_FLOOR))
        return {EMBEDDING: projected, EXPLAINED_VARIANCE: tf.fill(rows, explained)}

    return preprocessing_fn


def _tensor_adapter_config(dim: int):
    from tensorflow_metadata.proto.v0 import schema_pb2
    from tfx_bsl.public import tfxio

    dense = schema_pb2.TensorRepresentation.DenseTensor(
        column_name=EMBEDDING, shape=schema_pb2.FixedShape(dim=[schema_pb2.FixedShape.Dim(size=dim)])
    )
    representation = schema_pb2.TensorRepresentation(dense_tensor=dense)
    return tfxio.TensorAdapterConfig(
        pa.schema([(EMBEDDING, pa.list_(pa.float32()))]), {EMBEDDING: representation}
    )


def _as_list_batches(table: pa.Table) -> list[pa.RecordBatch]:
    """TFXIO reads variable-length lists; our column is a fixed-size list of the same floats."""
    column = table.column(EMBEDDING).cast(pa.list_(pa.float32()))
    return pa.Table.from_arrays([column], names=[EMBEDDING]).to_batches()


def check_runner(pipeline_args) -> None:
    """Refuses, before any work, a runner the analysis cannot run on."""
    if any(arg in (f"--runner={DASK_RUNNER}", DASK_RUNNER) for arg in pipeline_args):
        raise ValueError(
            "Beam's DaskRunner cannot run the tf.Transform analysis: it hands every output of a "
            "multi-output step to every consumer, and tf.Transform's combiners then fail (Beam 2.77). "
            "Run the --dims/--center stage on the local runner, Dataflow or Flink"
        )


def analyze(
    embedding_files: list[str],
    dim: int,
    options: TransformOptions,
    output_dir: str,
    pipeline_args=(),
    private_copy: str | None = None,
) -> str:
    """Runs the full pass with tft_beam on the given Beam runner; writes the graph
    into ``output_dir`` (any Beam filesystem), and first into ``private_copy`` when
    given (an index version's own, which no other run replaces), and returns it.

    tf.Transform itself writes through TensorFlow's filesystems, on the workers: its
    working files go in a temporary folder of this machine on the local runner
    (its workers share the disk), else under Beam's ``--temp_location`` (gs:// on
    Dataflow). The finished graph is then copied to ``output_dir``."""
    import apache_beam as beam
    import tensorflow_transform.beam as tft_beam
    from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions

    check_runner(pipeline_args)
    beam_options = PipelineOptions(list(pipeline_args))
    preprocessing_fn = preprocessing_fn_for(options, dim)
    temp_location = (
        None if local_workers(beam_options) else beam_options.view_as(GoogleCloudOptions).temp_location
    )
    if temp_location is None and not local_workers(beam_options):
        raise ValueError(
            "tf.Transform on a remote runner needs Beam's --temp_location (e.g. gs://bucket/tmp)"
        )
    local_temp = None if temp_location else tempfile.mkdtemp(prefix="imgembed-tft-")
    work = storage.join(temp_location or local_temp, f"imgembed-tft-{uuid.uuid4().hex}")
    written = storage.join(work, "graph")
    with (
        beam.Pipeline(options=beam_options) as pipeline,
        tft_beam.Context(temp_dir=storage.join(work, "tmp")),
    ):
        batches = (
            pipeline
            | "Files" >> beam.Create(embedding_files)
            | "Read" >> beam.io.ReadAllFromParquetBatched(columns=[EMBEDDING])
            | "AsLists" >> beam.FlatMap(_as_list_batches)
        )
        transform_fn = (batches, _tensor_adapter_config(dim)) | "Analyze" >> tft_beam.AnalyzeDataset(
            preprocessing_fn
        )
        _ = transform_fn | "Write" >> tft_beam.WriteTransformFn(written)
    metadata = options.to_metadata() | {"input_dim": dim}
    storage.write_atomically(storage.join(written, OPTIONS_FILE), json.dumps(metadata, indent=2).encode())
    if private_copy is not None:  # this run's own graph, whatever another analysis publishes meanwhile
        storage.copy_tree(written, private_copy)
    storage.delete_folder(output_dir)  # a graph of an earlier run must not mix with this one
    storage.copy_tree(written, output_dir)
    storage.delete_folder(work)
    if local_temp:
        shutil.rmtree(local_temp, ignore_errors=True)
    return output_dir


class EmbeddingTransform:
    """The analyzed graph, applied to raw embeddings: float32 [N, d] -> [N, k]."""

    def __init__(self, transform_dir: str):
        """``transform_dir`` on any Beam filesystem (read from a local copy)."""
        import tensorflow_transform as tft

        self.directory = transform_dir  # where others (Beam workers) can find it too
        local = transform_dir if storage.is_local(transform_dir) else local_path(transform_dir, folder=True)
        if not os.path.isdir(os.path.join(local, "transform_fn")):
            raise ValueError(f"{transform_dir} holds no tf.Transform graph (transform_fn/)")
        self._output = tft.TFTransformOutput(local)
        with open(os.path.join(local, OPTIONS_FILE)) as file:
            self.options = json.load(file)

    def __call__(self, vectors: np.ndarray) -> np.ndarray:
        return self._transform(vectors)[EMBEDDING]

    def _transform(self, vectors: np.ndarray) -> dict:
        import tensorflow as tf

        vectors = np.asarray(vectors, np.float32).reshape(len(vectors), -1)
        if len(vectors) == 0:
            return {EMBEDDING: np.zeros((0, self.output_dim), np.float32)}
        outputs = self._output.transform_raw_features({EMBEDDING: tf.constant(vectors)})
        return {name: tensor.numpy() for name, tensor in outputs.items()}

    @property
    def output_dim(self) -> int:
        return int(self._output.transformed_feature_spec()[EMBEDDING].shape[0])

    @property
    def input_dim(self) -> int:
        return int(self.options["input_dim"])

    def explained_variance(self) -> float:
        """Share of the corpus variance the kept components explain (from the full pass)."""
        return float(self._transform(np.ones((1, self.input_dim), np.float32))[EXPLAINED_VARIANCE][0])

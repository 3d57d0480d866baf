"""TF1 frozen GraphDefs (.pb) of TF-Slim MobileNet V1, the embedded default among them.

The graph's input placeholder takes [-1, 1] images, as TF-Slim trained them;
the pooled feature is ``MobilenetV1/Logits/AvgPool_1a/AvgPool`` and the logits
``MobilenetV1/Predictions/Reshape`` (or ``.../SpatialSqueeze``). The graph is
wrapped as a ``tf.function`` that takes [0, 1] images, like a TF Hub module,
so it can also be saved as a SavedModel or converted to TFLite.
"""

from __future__ import annotations

import os
import pathlib

import tensorflow as tf

from imgembed.models.embedded import graph_file
from imgembed.models.embedder import Embedder, to_slim_range
from imgembed.models.errors import ModelLoadError
from imgembed.models.registry import Flavour, Format, ModelSpec

OUTPUTS = {
    Flavour.FEATURE_VECTOR: ("MobilenetV1/Logits/AvgPool_1a/AvgPool",),
    Flavour.CLASSIFICATION: ("MobilenetV1/Predictions/Reshape", "MobilenetV1/Logits/SpatialSqueeze"),
}


def read_graph_def(path: pathlib.Path) -> tf.compat.v1.GraphDef:
    graph_def = tf.compat.v1.GraphDef()
    try:
        graph_def.ParseFromString(path.read_bytes())
    except Exception as error:  # protobuf raises DecodeError and friends
        raise ModelLoadError(f"{path} is not a frozen TensorFlow GraphDef: {error}") from error
    return graph_def


def find_tensors(graph_def: tf.compat.v1.GraphDef, flavour: Flavour, where: str) -> tuple[str, str, int]:
    """(input tensor, output tensor, input side) of a TF-Slim MobileNet graph."""
    inputs = [n for n in graph_def.node if n.op == "Placeholder" and len(n.attr["shape"].shape.dim) == 4]
    if len(inputs) != 1:
        raise ModelLoadError(f"{where}: expected one 4-d image placeholder, found {[n.name for n in inputs]}")
    placeholder = inputs[0]
    side = placeholder.attr["shape"].shape.dim[1].size
    names = {node.name for node in graph_def.node}
    output = next((name for name in OUTPUTS[flavour] if name in names), None)
    if output is None or side < 1:
        raise ModelLoadError(
            f"{where}: not a TF-Slim MobileNet V1 graph with a fixed input size "
            f"(expected a node named one of {OUTPUTS[flavour]})"
        )
    # The graphs were frozen with a batch of one: open the batch dimension.
    placeholder.attr["shape"].shape.dim[0].size = -1
    return f"{placeholder.name}:0", f"{output}:0", side


class FrozenGraphModule(tf.Module):
    """A frozen graph called like a TF Hub image module: [0, 1] in."""

    def __init__(self, graph_def: tf.compat.v1.GraphDef, flavour: Flavour, where: str):
        super().__init__(name="frozen_graph")
        input_name, output_name, self.image_size = find_tensors(graph_def, flavour, where)
        imported = tf.compat.v1.wrap_function(lambda: tf.compat.v1.import_graph_def(graph_def, name=""), [])
        self._graph_fn = imported.prune(feeds=input_name, fetches=output_name)
        # A traced function with a fixed signature: callable, savable, convertible to TFLite.
        self.serve = tf.function(
            self._call,
            input_signature=[tf.TensorSpec([None, self.image_size, self.image_size, 3], tf.float32)],
        )

    def _call(self, images):
        outputs = self._graph_fn(to_slim_range(images))
        return tf.reshape(outputs, [tf.shape(images)[0], -1])

    def __call__(self, images):
        return self.serve(images)


def load_module(source: str, flavour: Flavour) -> FrozenGraphModule:
    path = graph_file(source)
    return FrozenGraphModule(read_graph_def(path), flavour, str(path))


def describe(source: str, flavour: Flavour) -> ModelSpec:
    module = load_module(source, flavour)
    width = int(module(tf.zeros([1, module.image_size, module.image_size, 3])).shape[1])
    name = os.path.splitext(os.path.basename(source))[0] + (
        "_classification" if flavour is Flavour.CLASSIFICATION else ""
    )
    return ModelSpec(name, source, module.image_size, width, flavour, Format.FROZEN_GRAPH)


def traceable_function(spec: ModelSpec):
    """A tf.function of one [1, S, S, 3] image in [0, 1], and what must stay alive for it."""
    module = load_module(spec.source, spec.flavour)
    signature = tf.TensorSpec([1, spec.image_size, spec.image_size, 3], tf.float32)
    return tf.function(module.serve).get_concrete_function(signature), module


def load(spec: ModelSpec) -> Embedder:
    module = load_module(spec.source, spec.flavour)
    return Embedder(spec, lambda images: module(tf.constant(images)).numpy(), keep_alive=module)

"""Keras MobileNet files: legacy ``.h5`` (read with tf_keras, Keras 2, which wrote
them; Keras 3 cannot parse their layer configs) and ``.keras`` (Keras 3).

Keras applications' MobileNet takes [-1, 1] images (``mobilenet.preprocess_input``).
The feature-vector flavour reads the last global average pooling layer; the
classification flavour the model's output (Keras classifiers have 1000 classes,
without ImageNet's "background").
"""

from __future__ import annotations

import os

import numpy as np

from imgembed.models.embedder import Embedder, to_slim_range
from imgembed.models.errors import ModelLoadError
from imgembed.models.registry import Flavour, Format, ModelSpec


def _load_file(path: str):
    try:
        if path.endswith(".h5"):
            import tf_keras

            return tf_keras.models.load_model(path, compile=False), tf_keras
        import keras

        return keras.models.load_model(path, compile=False), keras
    except (OSError, ValueError, TypeError) as error:
        raise ModelLoadError(f"{path} is not a Keras model file: {error}") from error


def _model_for(path: str, flavour: Flavour):
    model, library = _load_file(path)
    if flavour is Flavour.CLASSIFICATION:
        return model
    pools = [layer for layer in model.layers if "GlobalAveragePooling2D" in type(layer).__name__]
    if not pools:
        raise ModelLoadError(f"{path}: no global average pooling layer to read features from")
    return library.Model(model.input, pools[-1].output)


def _image_size(model, path: str) -> int:
    shape = model.input_shape
    if len(shape) != 4 or shape[1] is None or shape[1] != shape[2] or shape[3] != 3:
        raise ModelLoadError(f"{path}: expected a fixed [S, S, 3] image input, found {shape}")
    return int(shape[1])


def describe(source: str, flavour: Flavour) -> ModelSpec:
    model = _model_for(source, flavour)
    size = _image_size(model, source)
    width = int(np.prod(model.output_shape[1:]))
    name = os.path.splitext(os.path.basename(source))[0] + (
        "_classification" if flavour is Flavour.CLASSIFICATION else ""
    )
    return ModelSpec(name, source, size, width, flavour, Format.KERAS)


def traceable_function(spec: ModelSpec):
    """A tf.function of one [1, S, S, 3] image in [0, 1], and what must stay alive for it."""
    import tensorflow as tf

    model = _model_for(spec.source, spec.flavour)
    signature = tf.TensorSpec([1, spec.image_size, spec.image_size, 3], tf.float32)
    function = tf.function(lambda images: model(to_slim_range(images), training=False))
    return function.get_concrete_function(signature), model


def load(spec: ModelSpec) -> Embedder:
    model = _model_for(spec.source, spec.flavour)
    return Embedder(
        spec, lambda images: np.asarray(model(to_slim_range(images), training=False)), keep_alive=model
    )

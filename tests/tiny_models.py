"""Small MobileNet V1 models the tests build themselves, seeded, in TF Hub layouts.

The architecture is MobileNet V1's (a strided 3x3 conv, then 13 depthwise-separable
blocks, then a global average pool), with the depth multiplier and input size
as parameters; weights are seeded random, batch norm folded into biases.
``save_tf2_module`` writes what TF Hub's v4 ``feature_vector`` modules are: a
TF2 SavedModel whose object is called on float32 [N, S, S, 3] images in [0, 1].
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

# (pointwise output channels at depth 1.0, stride of the depthwise conv) per block.
BLOCKS = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)]
BLOCKS += [(512, 1)] * 5 + [(1024, 2), (1024, 1)]


def mobilenet_v1_weights(depth_multiplier: float, seed: int) -> list[np.ndarray]:
    """He-initialised weights; biases small and positive so ReLU6 stays alive."""
    rng = np.random.default_rng(seed)

    def he(shape, fan_in):
        return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    def bias(channels):
        return rng.uniform(0.0, 0.2, channels).astype(np.float32)

    channels = int(32 * depth_multiplier)
    weights = [he([3, 3, 3, channels], 27), bias(channels)]
    for out_channels, _ in BLOCKS:
        out_channels = int(out_channels * depth_multiplier)
        weights += [he([3, 3, channels, 1], 9), bias(channels)]
        weights += [he([1, 1, channels, out_channels], channels), bias(out_channels)]
        channels = out_channels
    return weights


def mobilenet_v1_features(weights, images):
    """MobileNet V1 on images in [0, 1] (scaled to [-1, 1] inside, as TF-Slim's)."""
    return tf.reduce_mean(mobilenet_v1_trunk(weights, images * 2.0 - 1.0), axis=[1, 2])


def mobilenet_v1_trunk(weights, net):
    """The convolutional layers on [-1, 1] images, up to the last activation map."""
    net = tf.nn.relu6(tf.nn.conv2d(net, weights[0], 2, "SAME") + weights[1])
    for index, (_, stride) in enumerate(BLOCKS):
        depthwise, depthwise_bias, pointwise, pointwise_bias = weights[2 + 4 * index : 6 + 4 * index]
        net = tf.nn.depthwise_conv2d(net, depthwise, [1, stride, stride, 1], "SAME")
        net = tf.nn.relu6(net + depthwise_bias)
        net = tf.nn.relu6(tf.nn.conv2d(net, pointwise, 1, "SAME") + pointwise_bias)
    return net


class TinyMobileNetV1(tf.Module):
    """Called like a TF Hub feature_vector module."""

    def __init__(self, depth_multiplier: float, seed: int):
        super().__init__()
        self.weights = [tf.Variable(w) for w in mobilenet_v1_weights(depth_multiplier, seed)]

    @tf.function
    def __call__(self, images):
        return mobilenet_v1_features(self.weights, images)


def save_tf2_module(path: str, image_size: int = 64, depth_multiplier: float = 0.25, seed: int = 0) -> str:
    """Saves a seeded tiny MobileNet V1 with a fixed input size, as hub's v1 modules had."""
    module = TinyMobileNetV1(depth_multiplier, seed)
    # Trace the one input shape the SavedModel will declare.
    module.__call__.get_concrete_function(tf.TensorSpec([None, image_size, image_size, 3], tf.float32))
    tf.saved_model.save(module, path)
    return path


# --- The same seeded network in the other formats the MobileNet V1 family ships in.

FEATURE_NODE = "MobilenetV1/Logits/AvgPool_1a/AvgPool"
LOGITS_NODE = "MobilenetV1/Predictions/Reshape"


def classifier_weights(
    depth_multiplier: float, seed: int, classes: int = 1001
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed + 1)
    width = int(1024 * depth_multiplier)
    return (rng.standard_normal((width, classes)) / np.sqrt(width)).astype(np.float32), np.zeros(
        classes, np.float32
    )


def _slim_graph(
    image_size: int | None, depth_multiplier: float, seed: int, input_name: str, batch: int | None
):
    """A TF1 graph as TF-Slim exported them: placeholder in [-1, 1], named
    pooled-feature and logits nodes, constants for weights."""
    graph = tf.Graph()
    with graph.as_default():
        images = tf.compat.v1.placeholder(tf.float32, [batch, image_size, image_size, 3], name=input_name)
        weights = [tf.constant(w) for w in mobilenet_v1_weights(depth_multiplier, seed)]
        trunk = mobilenet_v1_trunk(weights, images)
        with tf.name_scope("MobilenetV1/Logits/AvgPool_1a"):
            pooled = tf.nn.avg_pool2d(trunk, trunk.shape[1:3], 1, "VALID", name="AvgPool")
        kernel, bias = classifier_weights(depth_multiplier, seed)
        logits = tf.matmul(tf.reshape(pooled, [-1, kernel.shape[0]]), kernel) + bias
        with tf.name_scope("MobilenetV1/Predictions"):
            logits = tf.reshape(logits, [-1, 1001], name="Reshape")
    return graph, images, pooled, logits


def save_frozen_graph(path: str, image_size: int = 64, depth_multiplier: float = 0.25, seed: int = 0) -> str:
    graph, *_ = _slim_graph(image_size, depth_multiplier, seed, "input", batch=1)
    with open(path, "wb") as file:
        file.write(graph.as_graph_def().SerializeToString())
    return path


def save_tflite(path: str, image_size: int = 64, depth_multiplier: float = 0.25, seed: int = 0) -> str:
    """A float classifier .tflite as the TF-Slim release converted them (TF1 converter,
    [-1, 1] input, the pooled feature an inner tensor)."""
    pb = path + ".pb"
    save_frozen_graph(pb, image_size, depth_multiplier, seed)
    converter = tf.compat.v1.lite.TFLiteConverter.from_frozen_graph(
        pb,
        input_arrays=["input"],
        output_arrays=[LOGITS_NODE],
        input_shapes={"input": [1, image_size, image_size, 3]},
    )
    with open(path, "wb") as file:
        file.write(converter.convert())
    return path


def save_tf1_hub_module(
    path: str, image_size: int | None = 64, depth_multiplier: float = 0.25, seed: int = 0
) -> str:
    """A TF1 Hub format module (what hub.Module loaded): a SavedModel with tags []
    and signatures ``default`` and ``image_feature_vector`` on [0, 1] images,
    plus ``tfhub_module.pb``. ``image_size=None`` makes a variable-size (v3) module."""
    graph = tf.Graph()
    with graph.as_default():
        images = tf.compat.v1.placeholder(tf.float32, [None, image_size, image_size, 3], name="images")
        weights = [tf.constant(w) for w in mobilenet_v1_weights(depth_multiplier, seed)]
        features = mobilenet_v1_features(weights, images)
        signature = tf.compat.v1.saved_model.signature_def_utils.predict_signature_def(
            inputs={"images": images}, outputs={"default": features}
        )
        builder = tf.compat.v1.saved_model.Builder(path)
        with tf.compat.v1.Session(graph=graph) as session:
            builder.add_meta_graph_and_variables(
                session, [], signature_def_map={"default": signature, "image_feature_vector": signature}
            )
        builder.save()
    with open(f"{path}/tfhub_module.pb", "wb") as file:
        file.write(b"\x08\x03")  # a ModuleDef proto: format 3
    return path


def reference_features(images: np.ndarray, depth_multiplier: float = 0.25, seed: int = 0) -> np.ndarray:
    """The network's own output on [0, 1] images, computed directly."""
    weights = [tf.constant(w) for w in mobilenet_v1_weights(depth_multiplier, seed)]
    return mobilenet_v1_features(weights, tf.constant(images, tf.float32)).numpy()


def save_keras_mobilenet(
    path: str, image_size: int = 64, depth_multiplier: float = 0.25, seed: int = 0
) -> str:
    """Keras applications' MobileNet with its 1000-class top, seeded random weights:
    ``.h5`` through tf_keras (the format older zoos ship), ``.keras`` through Keras 3."""
    if path.endswith(".h5"):
        import tf_keras as library
    else:
        import keras as library
    library.utils.set_random_seed(seed)
    model = library.applications.MobileNet(
        input_shape=(image_size, image_size, 3), alpha=depth_multiplier, weights=None, classes=1000
    )
    model.save(path)
    return path

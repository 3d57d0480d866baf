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
    net = images * 2.0 - 1.0
    net = tf.nn.relu6(tf.nn.conv2d(net, weights[0], 2, "SAME") + weights[1])
    for index, (_, stride) in enumerate(BLOCKS):
        depthwise, depthwise_bias, pointwise, pointwise_bias = weights[2 + 4 * index : 6 + 4 * index]
        net = tf.nn.depthwise_conv2d(net, depthwise, [1, stride, stride, 1], "SAME")
        net = tf.nn.relu6(net + depthwise_bias)
        net = tf.nn.relu6(tf.nn.conv2d(net, pointwise, 1, "SAME") + pointwise_bias)
    return tf.reduce_mean(net, axis=[1, 2])


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

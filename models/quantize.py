"""``imgembed quantize``: post-training int8 quantization of a float model to TFLite.

TF2 has no quantops modules: TF Hub's documented path to int8 is TFLite
post-training quantization, calibrated on representative inputs. Here those are
a sample of the user's own images, preprocessed exactly as the pipeline does.
Weights and activations become int8, except the few layers whose int8 error is
far above their quantization step (MobileNet V1's early depthwise layers, whose
folded batch norm spreads the weights): TFLite's quantization debugger measures
every layer on the calibration images and the worst ``--float-layers`` stay
float. The file takes the [0, 1] image and returns the float vector, so it drops
into the pipeline (``--model model_int8.tflite``). A fidelity report compares it
with the float model on other images: cosine per image, kNN@10 overlap, and
top-1 with labels.

    imgembed quantize --model mobilenet_v1_100_224_embedded --calibration 'photos/*.jpg' \\
        --output mobilenet_int8.tflite --evaluate 'held_out/*.jpg'
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys

import numpy as np

from imgembed.common import progress
from imgembed.models import tflite
from imgembed.models.errors import ModelLoadError
from imgembed.models.evaluation import KNN, embed_all, fidelity, read_images, read_labels, top1
from imgembed.models.loading import load_model, resolve_spec, traceable_function
from imgembed.models.registry import Flavour, ModelSpec
from imgembed.transforms.resize import Preprocessing

# A layer whose int8 error is this many times the error of rounding to its
# quantization step is "far above" it; only such layers may stay float.
ERROR_RATIO_FOR_FLOAT = 10.0
DEBUG_IMAGES = 20
# Part of the name of cached int8 files: bump it when convert_to_int8 changes what it writes.
CONVERSION_VERSION = 2


def convert_to_int8(
    spec: ModelSpec, calibration: np.ndarray, float_layers: int = 2
) -> tuple[bytes, list[str]]:
    """int8 TFLite bytes of the model, calibrated on float [n, S, S, 3] images in
    [0, 1], and the names of the layers kept float."""
    import tensorflow as tf

    function, keep_alive = traceable_function(spec)

    def converter():
        converter = tf.lite.TFLiteConverter.from_concrete_functions([function], keep_alive)
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([image[None]] for image in calibration)
        # int8 kernels, with float ones allowed for the layers kept float.
        converter.target_spec.supported_ops = [
            tf.lite.OpsSet.TFLITE_BUILTINS_INT8,
            tf.lite.OpsSet.TFLITE_BUILTINS,
        ]
        return converter

    def debug_images():
        return ([image[None]] for image in calibration[:DEBUG_IMAGES])

    kept_float = []
    if float_layers:
        debugger = tf.lite.experimental.QuantizationDebugger(
            converter=converter(), debug_dataset=debug_images
        )
        debugger.run()
        kept_float = _worst_layers(debugger, float_layers)
    options = tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=kept_float)
    debugger = tf.lite.experimental.QuantizationDebugger(
        converter=converter(), debug_dataset=debug_images, debug_options=options
    )
    data = tflite.global_pools_as_means(debugger.get_nondebug_quantized_model())
    return tflite.add_metadata(data, tflite.INPUT_RANGE_METADATA, tflite.UNIT_RANGE), kept_float


def quantize_in_child(spec: ModelSpec, calibration: np.ndarray, float_layers: int) -> bytes:
    """``convert_to_int8`` of uint8 calibration pixels, in a fresh child process, so
    that the caller (a job's launcher) never loads TensorFlow (~600 MB for good).
    The converter's own chatter (a line per layer from C++) goes to a log that is
    shown only if the child dies."""
    import multiprocessing
    import tempfile

    spawn = multiprocessing.get_context("spawn")
    receive, send = spawn.Pipe(duplex=False)
    with tempfile.NamedTemporaryFile(prefix="imgembed-quantize-", suffix=".log") as log:
        child = spawn.Process(
            target=_convert_and_send, args=(spec, calibration, float_layers, send, log.name), daemon=True
        )
        child.start()
        send.close()
        try:
            succeeded, value = receive.recv()
        except EOFError:
            child.join()
            last_lines = log.read().decode(errors="replace").strip().splitlines()[-5:]
            raise ModelLoadError(
                f"the process quantizing {spec.name} died (exit code {child.exitcode})"
                + "".join(f"\n  {line}" for line in last_lines)
            ) from None
        finally:
            child.join()
            receive.close()
    if not succeeded:
        raise value
    return value


def _convert_and_send(spec: ModelSpec, calibration: np.ndarray, float_layers: int, send, log: str) -> None:
    with open(log, "wb") as chatter:  # before TensorFlow starts writing to fds 1 and 2
        os.dup2(chatter.fileno(), 1)
        os.dup2(chatter.fileno(), 2)
    from imgembed.models.embedder import scale_pixels

    try:
        answer = (True, convert_to_int8(spec, scale_pixels(calibration), float_layers)[0])
    except Exception as error:  # sent to the parent, which raises it
        answer = (False, ModelLoadError(f"cannot quantize {spec.name}: {error}"))
    send.send(answer)


def _worst_layers(debugger, count: int) -> list[str]:
    buffer = io.StringIO()
    debugger.layer_statistics_dump(buffer)
    buffer.seek(0)
    ratios = []
    for row in csv.DictReader(buffer):
        scale = float(row["scale"] or 0)
        if scale:
            rounding_error = scale**2 / 12  # variance of uniform rounding to the step
            ratios.append((float(row["mean_squared_error"]) / rounding_error, row["tensor_name"]))
    ratios.sort(reverse=True)
    return [name for ratio, name in ratios[:count] if ratio > ERROR_RATIO_FOR_FLOAT]


def layer_name(tensor_name: str) -> str:
    """TFLite names fused tensors 'a;b;c'; the first part names the layer."""
    return tensor_name.split(";")[0]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="imgembed quantize", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", required=True, help="The float model (short name, handle, folder, .pb, .h5)."
    )
    parser.add_argument("--calibration", required=True, help="Glob of your own images to calibrate on.")
    parser.add_argument("--calibration-size", type=int, default=200, help="Images used to calibrate (200).")
    parser.add_argument(
        "--output", required=True, help="The .tflite file to write (a .json report goes beside it)."
    )
    parser.add_argument(
        "--evaluate",
        default=None,
        help="Glob of images to compare float and int8 on (default: --calibration).",
    )
    parser.add_argument("--evaluate-size", type=int, default=500, help="Images compared (500).")
    parser.add_argument(
        "--labels",
        default=None,
        help="'file name,class' lines: report top-1 too (for #classification models).",
    )
    parser.add_argument("--resize", default="crop", help="Preprocessing, as for `imgembed embed` (crop).")
    parser.add_argument("--central-fraction", type=float, default=1.0)
    parser.add_argument(
        "--float-layers",
        type=int,
        default=2,
        help="Most layers kept float when int8 hurts them most (2; 0: none).",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        preprocessing = Preprocessing(args.resize, args.central_fraction)
        spec = resolve_spec(args.model)
        calibration, _ = read_images(
            args.calibration, args.calibration_size, preprocessing, spec.image_size, args.seed
        )
        with progress.phase("quantize: calibration", len(calibration), "images"):
            int8_bytes, kept_float = convert_to_int8(spec, calibration, args.float_layers)
        with open(args.output, "wb") as file:
            file.write(int8_bytes)
        images, paths = read_images(
            args.evaluate or args.calibration,
            args.evaluate_size,
            preprocessing,
            spec.image_size,
            args.seed + 1,
        )
        quantized = resolve_spec(
            args.output + ("#classification" if spec.flavour is Flavour.CLASSIFICATION else "")
        )
        report = {
            "model": spec.to_metadata(),
            "int8_file": args.output,
            "int8_bytes": len(int8_bytes),
            "calibration_images": len(calibration),
            "layers_kept_float": [layer_name(name) for name in kept_float],
            "preprocessing": preprocessing.to_metadata(),
        }
        with progress.phase("quantize: comparison with float", 2 * len(images), "images") as bar:
            float_vectors = embed_all(load_model(spec), images, on_batch=bar.advance)
            int8_vectors = embed_all(load_model(quantized), images, on_batch=bar.advance)
        report["fidelity"] = fidelity(float_vectors, int8_vectors)
        if args.labels and spec.flavour is Flavour.CLASSIFICATION:
            labels = read_labels(args.labels)
            report["top1"] = {
                "float": top1(float_vectors, paths, labels),
                "int8": top1(int8_vectors, paths, labels),
            }
    except (ModelLoadError, ValueError, OSError) as error:
        print(f"imgembed quantize: {error}", file=sys.stderr)
        return 2
    with open(os.path.splitext(args.output)[0] + ".json", "w") as file:
        json.dump(report, file, indent=2)
    quality = report["fidelity"]
    print(
        f"Wrote {args.output} ({len(int8_bytes) / 2**20:.1f} MiB, int8), calibrated on {len(calibration)} images; "
        f"kept float: {', '.join(layer_name(name) for name in kept_float) or 'nothing'}.\n"
        f"  vs float on {quality['images']} images: cosine mean {quality['cosine_mean']:.4f}, "
        f"min {quality['cosine_min']:.4f}; kNN@{KNN} overlap {quality[f'knn@{KNN}_overlap']:.3f}"
        + (
            f"\n  top-1: float {report['top1']['float']:.3f}, int8 {report['top1']['int8']:.3f}"
            if report.get("top1")
            else ""
        )
    )
    return 0

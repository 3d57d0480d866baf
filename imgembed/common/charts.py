"""Bar charts as self-contained SVG, for reports (no plotting library needed)."""

from __future__ import annotations

import html

BAR_WIDTH = 400
COLOURS = ("#2a7", "#37c", "#d84", "#999")


def bar_chart_svg(
    title: str, rows: list[tuple[str, list[float | None]]], series: list[str], fmt: str = ".1f"
) -> str:
    """Horizontal bars: one group per row, one bar per series value in it."""
    known = [value for _, values in rows for value in values if value is not None]
    top = max(known) if known else 1.0
    line = 20
    legend = "".join(
        f'<rect x="{330 + 130 * i}" y="26" width="12" height="12" fill="{COLOURS[i % len(COLOURS)]}"/>'
        f'<text x="{346 + 130 * i}" y="37">{html.escape(name)}</text>'
        for i, name in enumerate(series)
    )
    parts = [f'<text x="0" y="16" font-weight="bold">{html.escape(title)}</text>', legend]
    y = 50
    for name, values in rows:
        parts.append(f'<text x="0" y="{y + 14}">{html.escape(name)}</text>')
        for i, value in enumerate(values):
            width = 0 if value is None else BAR_WIDTH * value / (top or 1)
            label = "n/a" if value is None else format(value, fmt)
            colour = COLOURS[i % len(COLOURS)]
            parts.append(f'<rect x="330" y="{y}" width="{width:.1f}" height="{line - 4}" fill="{colour}"/>')
            parts.append(f'<text x="{335 + width:.1f}" y="{y + 13}">{label}</text>')
            y += line
        y += 8
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{330 + BAR_WIDTH + 140}" height="{y + 10}" '
        f'font-family="sans-serif" font-size="13">{"".join(parts)}</svg>'
    )

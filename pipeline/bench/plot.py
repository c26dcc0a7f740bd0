"""A sweep's curves as one self-contained SVG: no plotting library for two line charts."""
from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

WIDTH, HEIGHT = 420, 260           # one panel
LEFT, RIGHT, TOP, BOTTOM = 56, 16, 34, 44


def _ticks(top: float, count: int = 5) -> list[float]:
    """Round tick values from 0 to at least `top`."""
    if top <= 0:
        return [0.0, 1.0]
    raw = top / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    return [i * step for i in range(math.ceil(top / step) + 1)]


def _panel(x0: int, title: str, unit: str, xs: Sequence[float],
           series: Sequence[tuple[str, str, Sequence[float]]], reference: float | None) -> str:
    """One chart: `series` of (label, colour, ys) over `xs`; a dashed line at `reference`."""
    ys = [y for _, _, values in series for y in values] + ([reference] if reference else [])
    yticks = _ticks(max(ys, default=1.0))
    ymax = yticks[-1] or 1.0
    xmax = max(xs, default=1.0) or 1.0
    w, h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def px(x: float) -> float:
        return x0 + LEFT + w * x / xmax

    def py(y: float) -> float:
        return TOP + h * (1 - y / ymax)

    out = [f'<text x="{x0 + WIDTH / 2}" y="20" text-anchor="middle" font-weight="bold">'
           f'{escape(title)}</text>',
           f'<rect x="{x0 + LEFT}" y="{TOP}" width="{w}" height="{h}" fill="none" stroke="#888"/>']
    for y in yticks:
        out.append(f'<line x1="{x0 + LEFT}" x2="{x0 + LEFT + w}" y1="{py(y):.1f}" y2="{py(y):.1f}" '
                   f'stroke="#ddd"/><text x="{x0 + LEFT - 6}" y="{py(y) + 4:.1f}" '
                   f'text-anchor="end">{y:g}</text>')
    for x in xs:
        out.append(f'<text x="{px(x):.1f}" y="{TOP + h + 16}" text-anchor="middle">{x:g}</text>')
    out.append(f'<text x="{x0 + LEFT + w / 2}" y="{HEIGHT - 8}" text-anchor="middle">'
               f'sessions</text><text x="{x0 + 14}" y="{TOP + h / 2}" text-anchor="middle" '
               f'transform="rotate(-90 {x0 + 14} {TOP + h / 2})">{escape(unit)}</text>')
    if reference:
        out.append(f'<line x1="{x0 + LEFT}" x2="{x0 + LEFT + w}" y1="{py(reference):.1f}" '
                   f'y2="{py(reference):.1f}" stroke="#c00" stroke-dasharray="4 3"/>')
    for k, (label, colour, values) in enumerate(series):
        points = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(xs, values, strict=True))
        out.append(f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="2"/>')
        out.extend(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{colour}"/>'
                   for x, y in zip(xs, values, strict=True))
        out.append(f'<text x="{x0 + LEFT + 8}" y="{TOP + 16 + 16 * k}" fill="{colour}">'
                   f'{escape(label)}</text>')
    return "\n".join(out)


def sweep_svg(title: str, sessions: Sequence[int], fps: Sequence[float],
              latency: Sequence[tuple[str, Sequence[float]]]) -> str:
    """Two panels: delivered frames/s (the slowest session; 25 dashed) and latencies (ms)."""
    colours = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd")
    xs = [float(s) for s in sessions]
    left = _panel(0, "delivered frames/s (slowest session)", "frames/s", xs,
                  [("min fps", colours[0], fps)], 25.0)
    right = _panel(WIDTH, "latency", "ms", xs,
                   [(label, colours[1 + k % 3], values)
                    for k, (label, values) in enumerate(latency)], None)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * WIDTH}" height="{HEIGHT + 24}" '
            f'font-family="sans-serif" font-size="11">\n<rect width="100%" height="100%" '
            f'fill="white"/>\n<text x="{WIDTH}" y="{HEIGHT + 16}" text-anchor="middle" '
            f'fill="#555">{escape(title)}</text>\n{left}\n{right}\n</svg>\n')

"""Attainment-versus-load line plots for the benchmarks, drawn with PIL (no plotting library).

Why here: bench/burst.py and bench/simulate.py both plot SLO attainment per system against a
request rate or a burst size; one drawing function serves both.
"""

from __future__ import annotations

from pathlib import Path

COLOURS = {
    "micro": (31, 119, 180),
    "monolithic": (214, 39, 40),
    "mesh": (31, 119, 180),
    "research": (214, 39, 40),
    "strong": (44, 160, 44),
}


def attainment_plot(series: dict[str, list[tuple[float, float]]], title: str, xlabel: str, path: Path) -> None:
    """One line per system through its (x, attainment) points; attainment 0..1 on the y axis."""
    from PIL import Image, ImageDraw

    w, h, m = 640, 400, 60
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    xs = sorted({x for points in series.values() for x, _ in points})
    top = max(xs)
    d.rectangle([m, 20, w - 20, h - m], outline="black")

    def xy(x: float, att: float) -> tuple[float, float]:
        return m + (w - 20 - m) * x / top, h - m - (h - m - 20) * att

    for att in (0.0, 0.5, 0.9, 1.0):
        y = xy(0, att)[1]
        d.line([m, y, w - 20, y], fill=(210, 210, 210))
        d.text((8, y - 6), f"{att:.0%}", fill="black")
    for x in xs:
        d.text((xy(x, 0)[0] - 8, h - m + 6), f"{x:g}", fill="black")
    d.text((w // 2 - 60, h - 25), xlabel, fill="black")
    d.text((m, 4), title, fill="black")
    for i, (system, points) in enumerate(series.items()):
        colour = COLOURS.get(system, (0, 0, 0))
        pts = [xy(x, att) for x, att in sorted(points)]
        d.line(pts, fill=colour, width=3)
        for px, py in pts:
            d.ellipse([px - 4, py - 4, px + 4, py + 4], fill=colour)
        d.text((w - 160, 30 + 16 * i), system, fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)

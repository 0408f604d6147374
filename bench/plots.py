"""Attainment-versus-load line plots for the benchmarks, drawn with PIL (no plotting library).

Why here: bench/burst.py and bench/simulate.py both plot SLO attainment per system against a
request rate or a burst size, bench/diurnal.py GPUs in use over a day; one drawing function
serves them all.
"""

from __future__ import annotations

from pathlib import Path

COLOURS = {
    "micro": (31, 119, 180),
    "monolithic": (214, 39, 40),
    "mesh": (31, 119, 180),
    "research": (214, 39, 40),
    "strong": (44, 160, 44),
    "req/s": (150, 150, 150),
}


def attainment_plot(series: dict[str, list[tuple[float, float]]], title: str, xlabel: str, path: Path) -> None:
    """One line per system through its (x, attainment) points; attainment 0..1 on the y axis."""
    line_plot(series, title, xlabel, path, top=1.0, ticks=(0.0, 0.5, 0.9, 1.0), tick_label="{:.0%}")


def line_plot(
    series: dict[str, list[tuple[float, float]]],
    title: str,
    xlabel: str,
    path: Path,
    top: float,
    ticks: tuple[float, ...],
    tick_label: str = "{:g}",
    xticks: tuple[float, ...] | None = None,
) -> None:
    """One line per series through its (x, y) points, y from 0 to `top`, grid lines at `ticks`
    (x ticks: every x of the points unless `xticks` names them)."""
    from PIL import Image, ImageDraw

    w, h, m = 640, 400, 60
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    xs = sorted({x for points in series.values() for x, _ in points})
    right = max(xs)
    d.rectangle([m, 20, w - 20, h - m], outline="black")

    def xy(x: float, y: float) -> tuple[float, float]:
        return m + (w - 20 - m) * x / right, h - m - (h - m - 20) * y / top

    for tick in ticks:
        y = xy(0, tick)[1]
        d.line([m, y, w - 20, y], fill=(210, 210, 210))
        d.text((8, y - 6), tick_label.format(tick), fill="black")
    for x in xticks if xticks is not None else xs:
        d.text((xy(x, 0)[0] - 8, h - m + 6), f"{x:g}", fill="black")
    d.text((w // 2 - 60, h - 25), xlabel, fill="black")
    d.text((m, 4), title, fill="black")
    for i, (system, points) in enumerate(series.items()):
        colour = COLOURS.get(system, (0, 0, 0))
        pts = [xy(x, y) for x, y in sorted(points)]
        d.line(pts, fill=colour, width=3)
        if len(pts) <= 40:
            for px, py in pts:
                d.ellipse([px - 4, py - 4, px + 4, py + 4], fill=colour)
        d.text((w - 160, 30 + 16 * i), system, fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)

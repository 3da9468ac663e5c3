"""Draws the Teams app icons and copies the app package sources to where the installed code finds them.

Run from the repository root after changing the drawing or ``manifest.json``::

    python appPackage/make_icons.py

It writes ``appPackage/color.png`` (192x192, full colour) and ``appPackage/outline.png`` (32x32, white on
transparent: Teams tints it and rejects any other colour), then copies those two and
``appPackage/manifest.json`` into ``bot/package_data/``, which is what ``bot.package`` reads (it is
shipped with the Python package, where ``appPackage/`` is not). ``tests/bot/test_package.py`` fails if
the two copies differ, so the copy cannot be forgotten.

The drawing: a person (head and shoulders) with a presence dot, Teams' familiar shorthand for "status".
Shapes are drawn at 8x and scaled down, for smooth edges; the outline icon is built from an alpha mask
over pure white, so scaling can never blend in another colour.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
PACKAGE_DATA = HERE.parent / "bot" / "package_data"
SCALE = 8
BLUE = (15, 108, 189, 255)  # accentColor in manifest.json (#0F6CBD)
GREEN = (107, 183, 0, 255)  # Teams' "Available" green
WHITE = (255, 255, 255, 255)


def _person(draw: ImageDraw.ImageDraw, size: int, fill: int | tuple[int, int, int, int]) -> None:
    """Head and shoulders in a ``size`` box (the presence dot is drawn over the bottom right)."""
    s = size
    draw.ellipse((0.34 * s, 0.14 * s, 0.66 * s, 0.46 * s), fill=fill)  # head
    draw.pieslice((0.16 * s, 0.52 * s, 0.84 * s, 1.16 * s), 180, 360, fill=fill)  # shoulders


def color_icon(size: int = 192) -> Image.Image:
    big = size * SCALE
    img = Image.new("RGBA", (big, big), BLUE)
    d = ImageDraw.Draw(img)
    # The symbol sits in the middle ~2/3 of the tile, as Teams' icon guidance asks.
    pad = int(0.17 * big)
    inner = big - 2 * pad
    layer = Image.new("RGBA", (inner, inner), (0, 0, 0, 0))
    _person(ImageDraw.Draw(layer), inner, WHITE)
    img.alpha_composite(layer, (pad, pad))
    # Presence dot, bottom right, with a ring in the background colour to separate it from the person.
    r = 0.15 * big
    cx, cy = pad + 0.80 * inner, pad + 0.80 * inner
    ring = 0.035 * big
    d.ellipse((cx - r - ring, cy - r - ring, cx + r + ring, cy + r + ring), fill=BLUE)
    d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=GREEN)
    # A tick in the dot: "in sync".
    w = int(0.03 * big)
    d.line(
        [(cx - 0.5 * r, cy + 0.02 * r), (cx - 0.1 * r, cy + 0.42 * r), (cx + 0.55 * r, cy - 0.4 * r)],
        fill=WHITE,
        width=w,
    )
    return img.resize((size, size), Image.Resampling.LANCZOS)


def outline_icon(size: int = 32) -> Image.Image:
    big = size * SCALE
    mask = Image.new("L", (big, big), 0)
    d = ImageDraw.Draw(mask)
    pad = int(0.06 * big)
    inner = big - 2 * pad
    layer = Image.new("L", (inner, inner), 0)
    _person(ImageDraw.Draw(layer), inner, 255)
    mask.paste(layer, (pad, pad))
    r = 0.17 * big
    cx, cy = pad + 0.82 * inner, pad + 0.82 * inner
    gap = 0.06 * big
    d.ellipse((cx - r - gap, cy - r - gap, cx + r + gap, cy + r + gap), fill=0)  # transparent gap
    d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    small = mask.resize((size, size), Image.Resampling.LANCZOS)
    icon = Image.new("RGBA", (size, size), (255, 255, 255, 0))
    icon.putalpha(small)
    return icon


def main() -> None:
    color_icon().save(HERE / "color.png", optimize=True)
    outline_icon().save(HERE / "outline.png", optimize=True)
    PACKAGE_DATA.mkdir(parents=True, exist_ok=True)
    for name in ("manifest.json", "color.png", "outline.png"):
        shutil.copyfile(HERE / name, PACKAGE_DATA / name)
    print(f"wrote {HERE / 'color.png'}, {HERE / 'outline.png'}; copied the package sources to {PACKAGE_DATA}")


if __name__ == "__main__":
    main()

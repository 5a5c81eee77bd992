"""A tiny PNG writer (zlib + struct, no dependency) and the grouped bar chart of the report.

`Canvas` is an RGB pixel buffer with filled rectangles and a 5x7 bitmap font (upper case, digits
and a little punctuation: enough for labels and values); `Canvas.png()` encodes it as an 8-bit RGB
PNG (filter 0 on every row). `bar_chart(panels)` lays out one panel per (scenario, rate): groups
(p50, p90, p99) of bars, one bar per set-up, each labelled with its value.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

Color = tuple[int, int, int]

WHITE: Color = (255, 255, 255)
BLACK: Color = (0, 0, 0)
GREY: Color = (200, 200, 200)
SERIES_COLORS: tuple[Color, ...] = ((120, 120, 120), (31, 119, 180), (255, 127, 14), (44, 160, 44))

# 5x7 glyphs, one int per row, bit 4 = leftmost column.
_FONT: dict[str, tuple[int, ...]] = {
    "0": (0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E),
    "1": (0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E),
    "2": (0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F),
    "3": (0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E),
    "4": (0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02),
    "5": (0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E),
    "6": (0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E),
    "7": (0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08),
    "8": (0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E),
    "9": (0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C),
    "A": (0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11),
    "B": (0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E),
    "C": (0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E),
    "D": (0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C),
    "E": (0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F),
    "F": (0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10),
    "G": (0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F),
    "H": (0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11),
    "I": (0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E),
    "J": (0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C),
    "K": (0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11),
    "L": (0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F),
    "M": (0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11),
    "N": (0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11),
    "O": (0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E),
    "P": (0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10),
    "Q": (0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D),
    "R": (0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11),
    "S": (0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E),
    "T": (0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04),
    "U": (0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E),
    "V": (0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04),
    "W": (0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A),
    "X": (0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11),
    "Y": (0x11, 0x11, 0x11, 0x0A, 0x04, 0x04, 0x04),
    "Z": (0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F),
    ".": (0, 0, 0, 0, 0, 0x0C, 0x0C),
    ",": (0, 0, 0, 0, 0x0C, 0x04, 0x08),
    "/": (0, 0x01, 0x02, 0x04, 0x08, 0x10, 0),
    "-": (0, 0, 0, 0x1F, 0, 0, 0),
    ":": (0, 0x0C, 0x0C, 0, 0x0C, 0x0C, 0),
    "(": (0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02),
    ")": (0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08),
    "%": (0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03),
    " ": (0, 0, 0, 0, 0, 0, 0),
}
GLYPH_W, GLYPH_H = 6, 8  # with one column/row of spacing


class Canvas:
    def __init__(self, width: int, height: int, background: Color = WHITE) -> None:
        if width <= 0 or height <= 0 or width * height > 16_000_000:
            raise ValueError(f"canvas size {width}x{height} is out of range")
        self.width, self.height = width, height
        self.rows = [bytearray(bytes(background) * width) for _ in range(height)]

    def rect(self, x: int, y: int, w: int, h: int, color: Color) -> None:
        x0, y0 = max(0, x), max(0, y)
        x1, y1 = min(self.width, x + w), min(self.height, y + h)
        if x1 <= x0 or y1 <= y0:
            return
        span = bytes(color) * (x1 - x0)
        for row in self.rows[y0:y1]:
            row[x0 * 3 : x1 * 3] = span

    def pixel(self, x: int, y: int) -> Color:
        r = self.rows[y]
        return r[x * 3], r[x * 3 + 1], r[x * 3 + 2]

    def text(self, x: int, y: int, s: str, color: Color = BLACK, scale: int = 1) -> None:
        for i, ch in enumerate(s.upper()):
            glyph = _FONT.get(ch, _FONT[" "])
            gx = x + i * GLYPH_W * scale
            for gy, bits in enumerate(glyph):
                for col in range(5):
                    if bits & (0x10 >> col):
                        self.rect(gx + col * scale, y + gy * scale, scale, scale, color)

    @staticmethod
    def text_width(s: str, scale: int = 1) -> int:
        return len(s) * GLYPH_W * scale

    def png(self) -> bytes:
        raw = b"".join(b"\x00" + bytes(row) for row in self.rows)
        ihdr = struct.pack("!IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)
        return (
            b"\x89PNG\r\n\x1a\n"
            + _chunk(b"IHDR", ihdr)
            + _chunk(b"IDAT", zlib.compress(raw, 9))
            + _chunk(b"IEND", b"")
        )


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack("!I", len(data)) + kind + data + struct.pack("!I", zlib.crc32(kind + data))


@dataclass(frozen=True, slots=True)
class Panel:
    title: str
    groups: Sequence[str]  # e.g. p50, p90, p99
    series: Sequence[str]  # e.g. direct, mesh, haproxy
    values: Sequence[Sequence[float | None]]  # values[group][series]
    unit: str = "ms"
    log: bool | None = None  # None: a log axis when the values span more than LOG_SPAN


PANEL_W, PANEL_H = 420, 230
LOG_SPAN = 20.0  # largest/smallest positive value past which a panel's axis is logarithmic


def log_axis(p: Panel) -> bool:
    """Whether `p` is drawn on a log axis: asked for, or its values span orders of magnitude
    (the mesh's ms beside direct's µs would otherwise leave the small bars one pixel high)."""
    if p.log is not None:
        return p.log
    positive = [v for g in p.values for v in g if v is not None and v > 0]
    return bool(positive) and max(positive) / min(positive) > LOG_SPAN


def bar_height(value: float, low: float, peak: float, span: int, log: bool) -> int:
    """Pixels of a bar of `value` in an axis of `span` pixels from `low` (log) or 0 to `peak`."""
    if log:
        if value <= 0:
            return 1
        floor = low / 2  # the smallest bar still shows
        return max(1, round(span * math.log(value / floor) / math.log(peak / floor)))
    return max(1, round(span * value / peak))


def bar_chart(panels: Sequence[Panel], columns: int = 2) -> bytes:
    """One PNG with every panel in a grid, a legend on top; an empty list is an error."""
    if not panels:
        raise ValueError("a chart needs at least one panel")
    columns = max(1, min(columns, len(panels)))
    rows = (len(panels) + columns - 1) // columns
    legend_h = 30
    c = Canvas(columns * PANEL_W, legend_h + rows * PANEL_H)
    x = 10
    for i, name in enumerate(panels[0].series):
        c.rect(x, 10, 12, 12, SERIES_COLORS[i % len(SERIES_COLORS)])
        c.text(x + 16, 12, name, scale=1)
        x += 16 + Canvas.text_width(name) + 20
    for n, panel in enumerate(panels):
        _panel(c, panel, (n % columns) * PANEL_W, legend_h + (n // columns) * PANEL_H)
    return c.png()


def _panel(c: Canvas, p: Panel, ox: int, oy: int) -> None:
    c.text(ox + 10, oy + 6, p.title, scale=2)
    top, bottom, left, right = oy + 40, oy + PANEL_H - 24, ox + 10, ox + PANEL_W - 10
    c.rect(left, bottom, right - left, 1, BLACK)
    peak = max((v for g in p.values for v in g if v is not None), default=0.0) or 1.0
    log = log_axis(p)
    low = min((v for g in p.values for v in g if v is not None and v > 0), default=peak)
    group_w = (right - left) // max(1, len(p.groups))
    bar_w = max(4, (group_w - 20) // max(1, len(p.series)))
    for gi, group in enumerate(p.groups):
        gx = left + gi * group_w + 10
        c.text(gx + (group_w - 20) // 2 - Canvas.text_width(group) // 2, bottom + 6, group)
        for si, value in enumerate(p.values[gi]):
            if value is None:
                continue
            h = bar_height(value, low, peak, bottom - top - 12, log)
            bx = gx + si * bar_w
            c.rect(bx, bottom - h, bar_w - 3, h, SERIES_COLORS[si % len(SERIES_COLORS)])
            label = f"{value:.2f}" if value < 100 else f"{value:.0f}"
            c.text(bx, bottom - h - 9, label)
    unit = f"{p.unit}, log" if log else p.unit
    c.text(right - Canvas.text_width(unit), oy + 10, unit, GREY)

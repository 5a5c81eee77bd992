"""The pure-Python PNG writer produces PNGs that decode, with the pixels that were drawn."""

from __future__ import annotations

import struct
import zlib

import pytest

from nodeagent.bench.png import SERIES_COLORS, Canvas, Panel, bar_chart, bar_height, log_axis


def decode_png(data: bytes) -> tuple[int, int, list[bytes]]:
    """A minimal, strict decoder for 8-bit RGB, filter-0 PNGs: (width, height, rows)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "bad signature"
    pos, idat, width, height = 8, b"", 0, 0
    seen = []
    while pos < len(data):
        (length,) = struct.unpack("!I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack("!I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body), f"bad CRC on {kind!r}"
        seen.append(kind)
        if kind == b"IHDR":
            width, height, depth, ctype, _, _, _ = struct.unpack("!IIBBBBB", body)
            assert (depth, ctype) == (8, 2)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    assert seen[0] == b"IHDR"
    assert seen[-1] == b"IEND"
    raw = zlib.decompress(idat)
    stride = 1 + 3 * width
    assert len(raw) == stride * height
    rows = [raw[i * stride : (i + 1) * stride] for i in range(height)]
    assert all(r[0] == 0 for r in rows), "unexpected filter type"
    return width, height, [r[1:] for r in rows]


def pixel(rows: list[bytes], x: int, y: int) -> tuple[int, int, int]:
    r = rows[y]
    return r[3 * x], r[3 * x + 1], r[3 * x + 2]


def test_canvas_png_decodes_with_the_drawn_pixels() -> None:
    c = Canvas(20, 10)
    c.rect(2, 3, 4, 5, (10, 20, 30))
    c.rect(18, 8, 10, 10, (1, 2, 3))  # clipped at the edge
    width, height, rows = decode_png(c.png())
    assert (width, height) == (20, 10)
    assert pixel(rows, 2, 3) == (10, 20, 30)
    assert pixel(rows, 5, 7) == (10, 20, 30)
    assert pixel(rows, 6, 7) == (255, 255, 255)
    assert pixel(rows, 19, 9) == (1, 2, 3)


def test_text_draws_glyph_pixels() -> None:
    c = Canvas(12, 8)
    c.text(0, 0, "1")
    # "1" has its stem in the middle column on every row but the last.
    assert c.pixel(2, 2) == (0, 0, 0)
    assert c.pixel(0, 2) == (255, 255, 255)


def test_bar_chart_is_a_valid_png_with_bars_in_series_colors() -> None:
    panels = [
        Panel("l4 1000/s", ("p50", "p90", "p99"), ("direct", "mesh", "haproxy"),
              [[0.1, 0.3, 0.2], [0.2, 0.5, None], [0.4, 1.0, 0.6]]),
        Panel("http 1000/s", ("p50",), ("direct", "mesh", "haproxy"), [[1.0, 2.0, 3.0]]),
        Panel("connect 100/s", ("p50",), ("direct", "mesh", "haproxy"), [[1.0, 2.0, 3.0]]),
    ]  # fmt: skip
    width, height, rows = decode_png(bar_chart(panels))
    assert width == 2 * 420
    assert height == 30 + 2 * 230
    colors = {pixel(rows, x, y) for y in range(height) for x in range(0, width, 3)}
    for color in SERIES_COLORS[:3]:
        assert color in colors


def test_bar_chart_refuses_no_panels_and_canvas_bad_size() -> None:
    with pytest.raises(ValueError, match="at least one panel"):
        bar_chart([])
    with pytest.raises(ValueError, match="out of range"):
        Canvas(0, 5)


def test_values_spanning_orders_of_magnitude_get_a_log_axis() -> None:
    wide = Panel("http", ("p50",), ("direct", "mesh"), [[0.05, 40.0]])
    narrow = Panel("l4", ("p50",), ("direct", "mesh"), [[0.1, 0.3]])
    assert log_axis(wide)
    assert not log_axis(narrow)
    assert not log_axis(Panel("forced", ("p50",), ("direct",), [[0.05, 40.0]], log=False))
    # On the log axis the smallest bar stays readable; linear, it would be one pixel.
    assert bar_height(0.05, 0.05, 40.0, 150, log=True) > 10
    assert bar_height(0.05, 0.05, 40.0, 150, log=False) == 1
    assert bar_height(40.0, 0.05, 40.0, 150, log=True) == 150
    # Larger values stay taller.
    assert bar_height(1.0, 0.05, 40.0, 150, log=True) < bar_height(4.0, 0.05, 40.0, 150, log=True)
    data = bar_chart([wide, narrow])
    assert data[:8] == b"\x89PNG\r\n\x1a\n"

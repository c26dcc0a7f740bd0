"""JPEG frames encoded where they differ from their background: around the mouth.

A composited frame differs from its background frame only inside the crop rect, yet a
whole 720p JPEG costs ~1.4 ms a frame to encode, the most of a compositor's work. Every
JPEG here is written with a restart marker after each row of MCUs (4:2:0: 16 rows of
pixels), so each such row's entropy-coded bytes stand alone: the DC prediction starts
again at every marker. A compositor keeps each background's rows, encoded once
(`BackgroundJpegs`, least recently used first out past `compositor.background_jpeg_cache_mb`),
and for a frame encodes only the band of MCU rows that the rect covers, then joins the
background's rows above it, the band's and the background's below it, each marker
renumbered for its place. The band starts on an MCU row and spans the whole width, so its
blocks, quantised coefficients and standard Huffman codes are those of the same rows in
the whole frame encoded at once: a joined frame is that frame's JPEG byte for byte (the
tests compare the bytes). Restart markers change no decoded pixel, cost 2 bytes and a
partial byte a row (~0.1 % of a frame), and every decoder reads them.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import cv2
import numpy as np

MCU = 16          # pixels of an MCU's side with 4:2:0 chroma
RESTART = re.compile(rb"\xff[\xd0-\xd7]")  # RSTn: never in entropy-coded data (FF there is FF 00)
SOS, SOF_MARKERS = 0xDA, frozenset((0xC0, 0xC1, 0xC2))
EOI = b"\xff\xd9"

Rect = tuple[int, int, int, int]
Draw = Callable[[np.ndarray, Rect], np.ndarray]  # (pixels, the rect in them) -> a new image


class JpegError(RuntimeError):
    """The encoder wrote what this module cannot split (it never should)."""


@dataclass(frozen=True)
class RowJpeg:
    """A JPEG as its header (SOI to the end of SOS) and each MCU row's entropy-coded bytes."""

    header: bytes
    rows: tuple[bytes, ...]

    @property
    def nbytes(self) -> int:
        return len(self.header) + sum(map(len, self.rows))

    @cached_property
    def tables(self) -> bytes:
        """The header without the frame's size: equal for two encodes with the same
        tables (quantisation, Huffman, sampling), whatever their height."""
        out, i = bytearray(self.header), 2
        while i < len(out):
            marker, length = out[i + 1], int.from_bytes(out[i + 2:i + 4], "big")
            if marker in SOF_MARKERS:
                out[i + 5:i + 9] = bytes(4)  # height, width
            i += 2 + length
        return bytes(out)

    def joined(self, rows: tuple[bytes, ...] | None = None) -> bytes:
        """The JPEG of this header and these rows (its own by default), markers in order."""
        rows = self.rows if rows is None else rows
        parts = [self.header]
        for k, row in enumerate(rows):
            if k:
                parts.append(bytes((0xFF, 0xD0 + (k - 1) % 8)))
            parts.append(row)
        parts.append(EOI)
        return b"".join(parts)


def encode_rows(image: np.ndarray, quality: int) -> RowJpeg:
    """`image` (HxWx3 uint8 BGR) as a 4:2:0 JPEG with a restart marker after each MCU row."""
    height, width = image.shape[:2]
    ok, buf = cv2.imencode(".jpg", image, [
        cv2.IMWRITE_JPEG_QUALITY, int(quality),
        cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420,
        cv2.IMWRITE_JPEG_RST_INTERVAL, -(-width // MCU)])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    data = buf.tobytes()
    i = 2  # past SOI: marker segments up to and including the start of scan
    while i + 4 <= len(data) and data[i] == 0xFF and data[i + 1] != SOS:
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    if i + 4 > len(data) or data[i] != 0xFF or not data.endswith(EOI):
        raise JpegError("no start of scan, or no end of image")
    i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    rows = tuple(RESTART.split(data[i:-2]))
    if len(rows) != -(-height // MCU):
        raise JpegError(f"{len(rows)} restart intervals for {height} rows of pixels")
    return RowJpeg(data[:i], rows)


def band_rows(rect: Rect, height: int) -> tuple[int, int]:
    """The MCU rows [first, end) that hold the rect's rows of pixels."""
    _, y1, _, y2 = rect
    rows = -(-height // MCU)
    first = min(max(0, y1) // MCU, rows - 1)
    return first, max(first + 1, min(rows, -(-y2 // MCU)))


class BackgroundJpegs:
    """One compositor's encoded backgrounds, by (segment, offset, quality), the least
    recently used dropped past `max_bytes` (0: none kept, every frame encoded whole)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.held = 0
        self.entries: OrderedDict[tuple[str, int, int], RowJpeg] = OrderedDict()

    def background(self, key: tuple[str, int, int], image: np.ndarray) -> RowJpeg | None:
        """The background's rows: kept, or encoded now and kept; None when it cannot be
        kept (no room at all)."""
        found = self.entries.get(key)
        if found is not None:
            self.entries.move_to_end(key)
            return found
        if self.max_bytes <= 0:
            return None
        made = encode_rows(image, key[2])
        if made.nbytes > self.max_bytes:
            return None
        while self.held + made.nbytes > self.max_bytes:
            self.held -= self.entries.popitem(last=False)[1].nbytes
        self.entries[key] = made
        self.held += made.nbytes
        return made

    def frame(self, key: tuple[str, int, int], background: np.ndarray, rect: Rect,
              draw: Draw) -> bytes:
        """The JPEG of `background` with `draw` applied to the MCU rows the rect covers:
        those rows encoded now, the others the background's as they were kept. Equal,
        byte for byte, to `draw(background, rect)` encoded whole."""
        height = background.shape[0]
        kept = self.background(key, background)
        if kept is None:
            return encode_rows(draw(background, rect), key[2]).joined()
        first, end = band_rows(rect, height)
        top = first * MCU
        x1, y1, x2, y2 = rect
        band = draw(background[top:min(height, end * MCU)], (x1, y1 - top, x2, y2 - top))
        drawn = encode_rows(band, key[2])
        if drawn.tables != kept.tables:  # another encoder's tables: no joining them
            return encode_rows(draw(background, rect), key[2]).joined()
        return kept.joined(kept.rows[:first] + drawn.rows + kept.rows[end:])

    def forget(self, segment: str) -> None:
        """Drop the backgrounds of a segment that is gone (an unloaded model's)."""
        for key in [k for k in self.entries if k[0] == segment]:
            self.held -= self.entries.pop(key).nbytes


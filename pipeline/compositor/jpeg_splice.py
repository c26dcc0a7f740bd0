"""JPEG frames encoded only where they differ from their background: around the mouth.

A composited frame differs from its background frame only inside the crop rect, yet a
whole 720p JPEG costs ~1.4 ms a frame to encode, the most of a compositor's work. Every
JPEG here is written with a restart marker every few MCUs (4:2:0: blocks of 16x16
pixels; a segment is 128 pixels wide where the frame's width allows, else a whole row of
MCUs), so each segment's entropy-coded bytes stand alone: the DC prediction starts again
at every marker. A compositor keeps each background's segments, encoded once
(`BackgroundJpegs`, least recently used out first past `compositor.background_jpeg_cache_mb`),
and for a frame encodes only the patch of segments that the rect covers, then puts them in
place of the background's, each marker renumbered for its place. The patch starts on a
segment's corner, so its blocks, quantised coefficients and standard Huffman codes are
those of the same segments in the whole frame encoded at once: a spliced frame is that
frame's JPEG byte for byte (the tests compare the bytes). Restart markers change no
decoded pixel and every decoder reads them; they cost 2 bytes and a partial byte each
(~2-5 % of a 720p frame).
"""
from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import cv2
import numpy as np

MCU = 16                   # pixels of an MCU's side with 4:2:0 chroma
SEGMENT_PX = 128           # the widest restart interval, in pixels ...
MIN_SEGMENT_PX = 64        # ... and the narrowest worth its markers (else a whole row)
RESTART = re.compile(rb"\xff[\xd0-\xd7]")  # RSTn: never in entropy-coded data (FF there is FF 00)
SOS, SOF_MARKERS = 0xDA, frozenset((0xC0, 0xC1, 0xC2))
EOI = b"\xff\xd9"

Rect = tuple[int, int, int, int]
Draw = Callable[[np.ndarray, Rect], np.ndarray]  # (pixels, the rect in them) -> a new image


class JpegError(RuntimeError):
    """The encoder wrote what this module cannot split (it never should)."""


def restart_interval(width: int) -> int:
    """MCUs a segment of a frame this wide: the most that divides a row of MCUs and spans
    at most SEGMENT_PX (a row's whole width when that would be under MIN_SEGMENT_PX)."""
    mcus = -(-width // MCU)
    most = max(d for d in range(1, SEGMENT_PX // MCU + 1) if mcus % d == 0)
    return most if most * MCU >= MIN_SEGMENT_PX else mcus


@dataclass(frozen=True)
class SegmentedJpeg:
    """A JPEG as its header (SOI to the end of SOS) and each restart interval's
    entropy-coded bytes, in raster order: `columns` of them a row of MCUs."""

    header: bytes
    segments: tuple[bytes, ...]
    columns: int

    @property
    def nbytes(self) -> int:
        return len(self.header) + sum(map(len, self.segments))

    @cached_property
    def tables(self) -> bytes:
        """The header without the image's size: equal for two encodes with the same
        tables (quantisation, Huffman, sampling, restart interval), whatever their size."""
        out, i = bytearray(self.header), 2
        while i < len(out):
            marker, length = out[i + 1], int.from_bytes(out[i + 2:i + 4], "big")
            if marker in SOF_MARKERS:
                out[i + 5:i + 9] = bytes(4)  # height, width
            i += 2 + length
        return bytes(out)

    def joined(self, segments: tuple[bytes, ...] | list[bytes] | None = None) -> bytes:
        """The JPEG of this header and these segments (its own by default), each marker
        numbered for its place."""
        parts = [self.header]
        for k, segment in enumerate(self.segments if segments is None else segments):
            if k:
                parts.append(bytes((0xFF, 0xD0 + (k - 1) % 8)))
            parts.append(segment)
        parts.append(EOI)
        return b"".join(parts)


def encode_segmented(image: np.ndarray, quality: int, interval: int) -> SegmentedJpeg:
    """`image` (HxWx3 uint8 BGR) as a 4:2:0 JPEG with a restart marker every `interval`
    MCUs, which must divide a row of its MCUs."""
    height, width = image.shape[:2]
    mcus = -(-width // MCU)
    if mcus % interval:
        raise ValueError(f"a restart interval of {interval} MCUs does not divide {mcus}")
    ok, buf = cv2.imencode(".jpg", image, [
        cv2.IMWRITE_JPEG_QUALITY, int(quality),
        cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420,
        cv2.IMWRITE_JPEG_RST_INTERVAL, interval])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    data = buf.tobytes()
    i = 2  # past SOI: marker segments up to and including the start of scan
    while i + 4 <= len(data) and data[i] == 0xFF and data[i + 1] != SOS:
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    if i + 4 > len(data) or data[i] != 0xFF or not data.endswith(EOI):
        raise JpegError("no start of scan, or no end of image")
    i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    segments = tuple(RESTART.split(data[i:-2]))
    columns = mcus // interval
    if len(segments) != -(-height // MCU) * columns:
        raise JpegError(f"{len(segments)} restart intervals for a {width}x{height} image")
    return SegmentedJpeg(data[:i], segments, columns)


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    """A whole image's JPEG, as every frame is written."""
    return encode_segmented(image, quality, restart_interval(image.shape[1])).joined()


def patch_region(rect: Rect, height: int, width: int) -> tuple[int, int, int, int]:
    """The MCU rows [row, row_end) and segment columns [column, column_end) that hold the
    rect's pixels."""
    x1, y1, x2, y2 = rect
    segment = restart_interval(width) * MCU
    rows, columns = -(-height // MCU), -(-width // segment)
    row = min(max(0, y1) // MCU, rows - 1)
    column = min(max(0, x1) // segment, columns - 1)
    return (row, max(row + 1, min(rows, -(-y2 // MCU))),
            column, max(column + 1, min(columns, -(-x2 // segment))))


class BackgroundJpegs:
    """One compositor's encoded backgrounds, by (shared-memory segment, offset, quality),
    the least recently used dropped past `max_bytes` (0: none kept, every frame encoded
    whole)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.held = 0
        self.entries: OrderedDict[tuple[str, int, int], SegmentedJpeg] = OrderedDict()

    def background(self, key: tuple[str, int, int], image: np.ndarray) -> SegmentedJpeg | None:
        """The background's segments: kept, or encoded now and kept; None when it cannot
        be kept (no room at all)."""
        found = self.entries.get(key)
        if found is not None:
            self.entries.move_to_end(key)
            return found
        if self.max_bytes <= 0:
            return None
        made = encode_segmented(image, key[2], restart_interval(image.shape[1]))
        if made.nbytes > self.max_bytes:
            return None
        while self.held + made.nbytes > self.max_bytes:
            self.held -= self.entries.popitem(last=False)[1].nbytes
        self.entries[key] = made
        self.held += made.nbytes
        return made

    def jpeg(self, key: tuple[str, int, int], image: np.ndarray) -> bytes:
        """The background's JPEG as it is: its kept segments joined, or (no room to keep
        it) encoded whole."""
        kept = self.background(key, image)
        return encode_jpeg(image, key[2]) if kept is None else kept.joined()

    def frame(self, key: tuple[str, int, int], background: np.ndarray, rect: Rect,
              draw: Draw) -> bytes:
        """The JPEG of `background` with `draw` applied to the segments the rect covers:
        those encoded now, the others the background's as they were kept. Equal, byte for
        byte, to `draw(background, rect)` encoded whole."""
        height, width = background.shape[:2]
        kept = self.background(key, background)
        if kept is None:
            return encode_jpeg(draw(background, rect), key[2])
        interval = restart_interval(width)
        row, row_end, column, column_end = patch_region(rect, height, width)
        top, left = row * MCU, column * interval * MCU
        x1, y1, x2, y2 = rect
        patch = draw(background[top:min(height, row_end * MCU),
                                left:min(width, column_end * interval * MCU)],
                     (x1 - left, y1 - top, x2 - left, y2 - top))
        drawn = encode_segmented(patch, key[2], interval)
        if drawn.tables != kept.tables:  # another encoder's tables: no splicing them
            return encode_jpeg(draw(background, rect), key[2])
        segments = list(kept.segments)
        for r in range(row, row_end):
            start = r * kept.columns
            segments[start + column:start + column_end] = \
                drawn.segments[(r - row) * drawn.columns:(r - row + 1) * drawn.columns]
        return kept.joined(segments)

    def forget(self, name: str) -> None:
        """Drop the backgrounds of a shared-memory segment that is gone (an unloaded
        model's)."""
        for key in [k for k in self.entries if k[0] == name]:
            self.held -= self.entries.pop(key).nbytes

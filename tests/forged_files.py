"""Hostile files for the tests: headers that claim more than the file holds."""

from __future__ import annotations


def forged_png(path, width: int, height: int) -> None:
    """A ~700-byte PNG whose header declares ``width`` x ``height`` 8-bit gray pixels (a
    decompression bomb's header, with a few hundred bytes of pixel data behind it)."""
    import struct
    import zlib

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(640), 0)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)

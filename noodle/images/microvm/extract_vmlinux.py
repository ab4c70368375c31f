#!/usr/bin/env python3
"""Extract the uncompressed ELF vmlinux from a bzImage (like the kernel's
scripts/extract-vmlinux): find each known compression magic, try to
decompress from there, keep the first result that is an ELF image.
The uncompressed image boots through its PVH note, skipping the
decompressor, which is about 2.8x faster under TCG."""

from __future__ import annotations

import gzip
import lzma
import subprocess
import sys
import zlib

MAGICS: list[tuple[str, bytes]] = [
    ("xz", b"\xfd7zXZ\x00"),
    ("zstd", b"\x28\xb5\x2f\xfd"),
    ("gzip", b"\x1f\x8b\x08"),
    ("lz4", b"\x02\x21\x4c\x18"),
    ("lzma", b"\x5d\x00\x00\x00"),
]


def _decompress(kind: str, data: bytes) -> bytes:
    if kind == "xz":
        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data)
    if kind == "lzma":
        return lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(data)
    if kind == "gzip":
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data)
    # The stdlib has neither zstd (before 3.14) nor lz4; their CLIs tolerate
    # the trailing junk after the payload (Debian's cloud kernel is lz4).
    argv = ["zstd", "-qdc"] if kind == "zstd" else ["lz4", "-dc"]
    proc = subprocess.run(argv, input=data, capture_output=True, check=False)
    return proc.stdout


def extract(image: bytes) -> bytes:
    for kind, magic in MAGICS:
        pos = image.find(magic)
        while pos >= 0:
            try:
                out = _decompress(kind, image[pos:])
            except (lzma.LZMAError, zlib.error, gzip.BadGzipFile, OSError, EOFError):
                out = b""
            if out[:4] == b"\x7fELF":
                return out
            pos = image.find(magic, pos + 1)
    raise SystemExit("no compressed ELF payload found")


def main() -> None:
    src, dst = sys.argv[1], sys.argv[2]
    with open(src, "rb") as f:
        data = f.read()
    with open(dst, "wb") as f:
        f.write(extract(data))


if __name__ == "__main__":
    main()

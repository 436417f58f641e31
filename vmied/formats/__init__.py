"""Format registry and content detection (design §3)."""

from __future__ import annotations

from ..errors import UnsupportedImage, UsageError
from ..io.base import Source
from ..pipeline import Workers
from .base import HEAD_SIZE, TAIL_SIZE, Reader, Writer
from .formats_available import READERS, WRITERS

#: Formats vmied recognises only to refuse them by name (magic at offset 0 unless noted).
_KNOWN_UNSUPPORTED: tuple[tuple[str, bytes], ...] = (
    ("bochs", b"Bochs Virtual HD Image"),
    ("parallels", b"WithoutFreeSpace"),
    ("parallels", b"WithouFreSpacExt"),
    ("cloop", b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop"),
    ("qed", b"QED\x00"),
    ("luks", b"LUKS\xba\xbe"),
    ("vdi", b"<<< Oracle VM VirtualBox Disk Image >>>"),
    ("vdi", b"<<< Sun VirtualBox Disk Image >>>"),
    ("vdi", b"<<< innotek VirtualBox Disk Image >>>"),
)


def reader_class(name: str) -> type[Reader]:
    for cls in READERS:
        if cls.format == name:
            return cls
    known = ", ".join(sorted(cls.format for cls in READERS))
    raise UsageError(f"unknown input format {name!r} (known: {known})")


def writer_class(name: str) -> type[Writer]:
    if name not in WRITERS:
        raise UsageError(f"unknown output format {name!r} (known: {', '.join(sorted(WRITERS))})")
    return WRITERS[name]


def output_formats() -> list[str]:
    return sorted(WRITERS)


def unsupported_format(head: bytes, tail: bytes) -> str | None:
    """The name of a recognised but unsupported format, if the content is one."""
    for name, magic in _KNOWN_UNSUPPORTED:
        if head.startswith(magic):
            return name
    if tail[:4] == b"koly":
        return "dmg"
    return None


async def detect(source: Source) -> type[Reader]:
    """The reader for this content; refuses unsupported and unrecognised content by name."""
    head = await source.read_at(0, min(HEAD_SIZE, source.size))
    tail = await source.read_at(max(0, source.size - TAIL_SIZE), min(TAIL_SIZE, source.size))
    for cls in READERS:
        if cls.format != "raw" and cls.probe(head, tail, source.size):
            return cls
    name = unsupported_format(head, tail)
    if name is not None:
        raise UnsupportedImage(f"unsupported input format: {name} ({source.name})", reason="format.unsupported")
    raise UnsupportedImage(
        f"unsupported input format: the content of {source.name} is not a disk image format vmied "
        "recognises (VMDK, VHD, VHDX, qcow2, OVA); if it is a raw disk, say so with -f raw",
        reason="format.unknown",
    )


async def open_reader(source: Source, workers: Workers, declared: str | None = None) -> Reader:
    """Detect (or check the declared) format and open the image."""
    if declared == "raw":
        cls = reader_class("raw")
    else:
        cls = await detect(source)
        if declared is not None and declared != cls.format:
            reader_class(declared)  # an unknown name is a usage error, not a mismatch
            raise UnsupportedImage(
                f"{source.name} was declared {declared} but its content is {cls.format}",
                reason="format.mismatch",
            )
    return await cls.open(source, workers)


__all__ = ["HEAD_SIZE", "TAIL_SIZE", "detect", "open_reader", "output_formats", "reader_class", "writer_class"]

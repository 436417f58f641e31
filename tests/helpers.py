"""Shared test helpers: the corpus, qemu-img as the reference, images with random sparse content."""

from __future__ import annotations

import asyncio
import bz2
import hashlib
import json
import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vmied.convert import Result, convert
from vmied.io.local import FileSink, FileSource
from vmied.pipeline import Progress, Workers

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "corpus"
MiB = 1 << 20


def corpus_rows() -> list[dict[str, Any]]:
    manifest = CORPUS / "manifest.json"
    if not manifest.exists():
        return []
    rows: list[dict[str, Any]] = json.loads(manifest.read_text())["rows"]
    return rows


def corpus_params(*categories: str, formats: tuple[str, ...] = ()) -> list[Any]:
    """pytest params for corpus rows of the categories whose format text starts with one of ``formats``."""
    rows = [
        row for row in corpus_rows()
        if row["category"] in categories and (not formats or row["format"].upper().startswith(formats))
    ]
    if not rows:
        return [pytest.param(None, marks=pytest.mark.skip(reason="../shared/corpus is absent"))]
    return [pytest.param(row, id=row["file"]) for row in rows]


def corpus_path(relative: str) -> Path:
    """A file under ``../shared/corpus/files``; the test is skipped where the corpus is absent."""
    path = CORPUS / "files" / relative
    if not path.exists():
        pytest.skip(f"../shared/corpus is absent ({relative})")
    return path


def corpus_file(row: dict[str, Any], cache: Path) -> Path:
    """The row's file, decompressed from its stored ``.bz2`` copy into ``cache`` when needed."""
    path = CORPUS / "files" / row["file"]
    if path.exists():
        return path
    packed = path.with_name(path.name + ".bz2")
    if not packed.exists():
        pytest.skip(f"{row['file']} is not in the corpus")
    out = cache / row["file"].replace("/", "__")
    if not out.exists():
        with bz2.open(packed) as src, open(str(out) + ".part", "wb") as dst:
            shutil.copyfileobj(src, dst, 4 * MiB)
        os.rename(str(out) + ".part", out)
    return out


def sha256_file(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            digest.update(chunk)
    return digest.hexdigest()


def qemu_img(*args: str | Path) -> str:
    out = subprocess.run(["qemu-img", *map(str, args)], check=True, capture_output=True, text=True)
    return out.stdout


def qemu_info(path: Path) -> dict[str, Any]:
    info: dict[str, Any] = json.loads(qemu_img("info", "--output=json", path))
    return info


def write_sparse_raw(path: Path, size: int, layout: list[tuple[int, int]], seed: int = 0) -> None:
    """A raw disk of ``size`` bytes with random data at each ``(offset, length)`` of ``layout``."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, length in layout:
            f.seek(offset)
            # half random (incompressible), half text-like (compressible), as real disks are
            f.write(rng.randbytes(length // 2) + bytes(rng.choice(b"abc \n") for _ in range(length - length // 2)))


def random_layout(rng: random.Random, size: int, count: int) -> list[tuple[int, int]]:
    layout = []
    for _ in range(count):
        offset = rng.randrange(0, size)
        length = min(rng.choice([1, 511, 512, 4096, 65536, 70000, 300000]), size - offset)
        layout.append((offset, length))
    return layout


def convert_file(
    src: Path | str, dst: Path | str, output_format: str, *, input_format: str | None = None,
    options: dict[str, str] | None = None,
) -> Result:
    """Run the real pipeline file to file (the same code path as ``vmied convert``)."""

    async def run() -> Result:
        source = await FileSource.open(str(src))
        try:
            sink = await FileSink.create(str(dst))
            with Workers() as workers:
                return await convert(source, sink, output_format, options=options, input_format=input_format,
                                     workers=workers, progress=Progress())
        finally:
            await source.close()

    return asyncio.run(run())


def leftovers(directory: Path) -> Iterator[Path]:
    """Partial outputs a failed conversion must never leave behind."""
    return (p for p in directory.iterdir() if ".vmied-partial-" in p.name)

"""OVA: tar walking, multi-disk appliances from VMware- and VirtualBox-style packages, manifests
checked while streaming, refusals, the writer (tar -t, qemu-img check, bit-exact round trips)."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import random
import subprocess
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import (
    CORPUS,
    MiB,
    convert_file,
    corpus_file,
    corpus_params,
    leftovers,
    qemu_img,
    random_layout,
    sha256_file,
    write_sparse_raw,
)
from vmied.errors import CorruptImage, ImageError, UnsupportedImage
from vmied.extents import Extent, Kind, checked
from vmied.formats import ova, ovf
from vmied.formats.raw import RawReader, RawWriter
from vmied.io.base import Source
from vmied.io.local import FileSink, FileSource
from vmied.io.slice import ConcatSource, DigestingSource, GunzipSource, SliceSource
from vmied.pipeline import Workers

# --- building packages at test time --------------------------------------------------------------


def make_disk(tmp: Path, name: str, size: int, seed: int) -> tuple[Path, Path]:
    """A raw disk with random sparse content and its streamOptimized VMDK made by qemu-img."""
    raw, vmdk = tmp / f"{name}.raw", tmp / f"{name}.vmdk"
    write_sparse_raw(raw, size, random_layout(random.Random(seed), size, 5), seed)
    qemu_img("convert", "-O", "vmdk", "-o", "subformat=streamOptimized", raw, vmdk)
    return raw, vmdk


def make_tar(path: Path, members: list[tuple[str, bytes]], fmt: int = tarfile.GNU_FORMAT) -> None:
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def manifest(entries: list[tuple[str, bytes]], algorithm: str = "SHA256", spaced: bool = False) -> bytes:
    lines = []
    for name, data in entries:
        digest = hashlib.new(algorithm.lower(), data).hexdigest()
        lines.append(f"{algorithm} ({name}) = {digest}\n" if spaced else f"{algorithm}({name})= {digest}\n")
    return "".join(lines).encode()


VBOX_OVF = """<?xml version="1.0"?>
<Envelope ovf:version="2.0" xml:lang="en-US" xmlns="http://schemas.dmtf.org/ovf/envelope/2"
  xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/2"
  xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
  xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData"
  xmlns:sasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_StorageAllocationSettingData.xsd"
  xmlns:vbox="http://www.virtualbox.org/ovf/machine">
  <References>{files}</References>
  <DiskSection><Info>List of the virtual disks used in the package</Info>{disks}</DiskSection>
  <VirtualSystem ovf:id="vbox">
    <Info>A virtual machine</Info>
    <OperatingSystemSection ovf:id="94"><Info>os</Info><Description>Ubuntu_64</Description>
      <vbox:OSType ovf:required="false">Ubuntu_64</vbox:OSType></OperatingSystemSection>
    <VirtualHardwareSection>
      <Info>Virtual hardware requirements for a virtual machine</Info>
      <Item><rasd:Address>0</rasd:Address><rasd:InstanceID>3</rasd:InstanceID>
        <rasd:ResourceSubType>PIIX4</rasd:ResourceSubType><rasd:ResourceType>5</rasd:ResourceType></Item>
      <Item><rasd:Address>0</rasd:Address><rasd:InstanceID>5</rasd:InstanceID>
        <rasd:ResourceSubType>AHCI</rasd:ResourceSubType><rasd:ResourceType>20</rasd:ResourceType></Item>
      {storage}
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
"""


def vbox_descriptor(hrefs: list[tuple[str, int]], ports: list[int]) -> bytes:
    """VirtualBox style: OVF 2.0, SATA disks as StorageItems on ``ports`` (so boot order != listing order)."""
    files = "".join(f'<File ovf:href="{h}" ovf:id="file{i}"/>' for i, (h, _) in enumerate(hrefs, 1))
    disks = "".join(
        f'<Disk ovf:capacity="{c}" ovf:diskId="vmdisk{i}" ovf:fileRef="file{i}" '
        'ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>'
        for i, (_, c) in enumerate(hrefs, 1)
    )
    storage = "".join(
        f"<StorageItem><sasd:AddressOnParent>{port}</sasd:AddressOnParent><sasd:HostResource>/disk/vmdisk{i}"
        f"</sasd:HostResource><sasd:InstanceID>{9 + i}</sasd:InstanceID><sasd:Parent>5</sasd:Parent>"
        "<sasd:ResourceType>17</sasd:ResourceType></StorageItem>"
        for i, port in enumerate(ports, 1)
    )
    return VBOX_OVF.format(files=files, disks=disks, storage=storage).encode()


def vmware_descriptor(specs: list[tuple[str, int, int]]) -> bytes:
    return ovf.build_descriptor(ovf.Hardware(name="vmw"), [ovf.DiskSpec(h, c, s) for h, c, s in specs])


async def read_disk(reader: Any, out: Path, workers: Workers) -> None:
    sink = await FileSink.create(str(out))
    await RawWriter(sink, reader.virtual_size, {}, workers).write(checked(reader.extents(), reader.virtual_size))
    await sink.commit()


async def import_all(path: Path, tmp: Path) -> list[tuple[str, Path]]:
    """Every disk of the appliance at ``path`` as raw files, in boot order: ``(href, raw path)``."""
    source = await FileSource.open(str(path))
    out = []
    try:
        with Workers() as workers:
            appliance = await ova.open_appliance(source, workers)
            for disk in appliance.disks:
                reader = await disk.open()
                target = tmp / f"imported-{disk.index}.raw"
                await read_disk(reader, target, workers)
                await reader.close()  # the next disk still reads from the same archive
                out.append((disk.file.href if disk.file else "", target))
    finally:
        await source.close()
    return out


def build_appliance(tmp: Path, style: str, fmt: int, long_names: bool) -> tuple[Path, list[Path]]:
    """A 3-disk OVA; returns it and the raw disks in the boot order its descriptor gives."""
    prefix = "d" * 120 if long_names else "disk"
    raws, members = [], []
    sizes = [3 * MiB, 5 * MiB + 512, 2 * MiB]
    for i, size in enumerate(sizes):
        raw, vmdk = make_disk(tmp, f"src{i}", size, seed=i)
        raws.append(raw)
        members.append((f"{prefix}-{i}.vmdk", vmdk.read_bytes()))
    if style == "vbox":
        text = vbox_descriptor([(name, size) for (name, _), size in zip(members, sizes, strict=True)], [2, 0, 1])
        order = [raws[1], raws[2], raws[0]]
    else:
        text = vmware_descriptor([(name, size, len(data)) for (name, data), size in zip(members, sizes, strict=True)])
        order = raws
    ovf_name = f"{prefix}.ovf"
    mf = manifest([(ovf_name, text), *members], "SHA1" if style == "vbox" else "SHA256", spaced=style == "vbox")
    path = tmp / "appliance.ova"
    make_tar(path, [(ovf_name, text), (f"{prefix}.mf", mf), *members], fmt)
    return path, order


@pytest.mark.parametrize(
    ("style", "fmt", "long_names"),
    [
        ("vmware", tarfile.GNU_FORMAT, False),
        ("vbox", tarfile.PAX_FORMAT, True),
        ("vmware", tarfile.GNU_FORMAT, True),
        ("vbox", tarfile.USTAR_FORMAT, False),
    ],
)
async def test_multi_disk_import_bit_exact_in_boot_order(
    tmp_path: Path, style: str, fmt: int, long_names: bool
) -> None:
    path, order = build_appliance(tmp_path, style, fmt, long_names)
    imported = await import_all(path, tmp_path)
    assert [sha256_file(p) for _, p in imported] == [sha256_file(p) for p in order]


def test_boot_disk_through_convert_and_info(tmp_path: Path) -> None:
    path, order = build_appliance(tmp_path, "vbox", tarfile.PAX_FORMAT, False)
    result = convert_file(path, tmp_path / "boot.raw", "raw")
    assert sha256_file(tmp_path / "boot.raw") == sha256_file(order[0])
    details = result.source.as_dict()
    assert details["format"] == "ova" and details["subformat"] == "vmdk" and details["manifest"] is True
    assert [(d["href"], d["boot_order"], d["format"], d["os_hint"]) for d in details["disks"]] == [
        ("disk-1.vmdk", 0, "vmdk", "Ubuntu_64"),
        ("disk-2.vmdk", 1, "vmdk", "Ubuntu_64"),
        ("disk-0.vmdk", 2, "vmdk", "Ubuntu_64"),
    ]


# --- manifest checked while streaming ------------------------------------------------------------


def test_disk_digest_mismatch_fails_at_end_naming_the_file(tmp_path: Path) -> None:
    _, vmdk = make_disk(tmp_path, "a", 2 * MiB, 1)
    data = vmdk.read_bytes()
    text = vmware_descriptor([("a.vmdk", 2 * MiB, len(data))])
    bad = manifest([("x.ovf", text)]) + f"SHA256(a.vmdk)= {'0' * 64}\n".encode()
    make_tar(tmp_path / "x.ova", [("x.ovf", text), ("x.mf", bad), ("a.vmdk", data)])
    with pytest.raises(CorruptImage, match=r"a\.vmdk") as info:
        convert_file(tmp_path / "x.ova", tmp_path / "out.raw", "raw")
    assert info.value.reason == "ova.digest"
    assert not (tmp_path / "out.raw").exists() and not list(leftovers(tmp_path))


def test_descriptor_digest_checked_up_front(tmp_path: Path) -> None:
    _, vmdk = make_disk(tmp_path, "a", 1 * MiB, 1)
    data = vmdk.read_bytes()
    text = vmware_descriptor([("a.vmdk", MiB, len(data))])
    mf = manifest([("x.ovf", text + b" "), ("a.vmdk", data)], "SHA1")
    make_tar(tmp_path / "x.ova", [("x.ovf", text), ("x.mf", mf), ("a.vmdk", data)])
    with pytest.raises(CorruptImage, match=r"x\.ovf") as info:
        convert_file(tmp_path / "x.ova", tmp_path / "out.raw", "raw")
    assert info.value.reason == "ova.digest"


async def test_digesting_source_hashes_out_of_order_and_skipped_reads(tmp_path: Path) -> None:
    data = random.Random(3).randbytes(3 * MiB + 77)
    (tmp_path / "f").write_bytes(data)
    source = await FileSource.open(str(tmp_path / "f"))
    with Workers() as workers:
        digesting = DigestingSource(source, "SHA256", workers)
        await digesting.read_at(MiB, 100)  # ahead: kept aside
        await asyncio.gather(*(digesting.read_at(o, 300_000) for o in range(0, 2 * MiB, 300_000)))
        await digesting.read_at(0, 10)  # behind: ignored
        assert await digesting.finish() == hashlib.sha256(data).hexdigest()
        bounded = DigestingSource(source, "SHA1", workers)
        bounded.AHEAD_LIMIT = 1000  # reads further ahead than this are dropped and read again at the end
        await bounded.read_at(5000, 2000)
        await bounded.read_at(2 * MiB, 500)
        assert len(bounded._ahead) == 1 and await bounded.finish() == hashlib.sha1(data).hexdigest()
    await source.close()


# --- chunked and gzip-compressed files ---------------------------------------------------------------


def test_chunked_and_gzip_disks(tmp_path: Path) -> None:
    raw0, vmdk0 = make_disk(tmp_path, "c", 3 * MiB, 4)
    raw1, vmdk1 = make_disk(tmp_path, "g", 2 * MiB, 5)
    chunked, packed = vmdk0.read_bytes(), gzip.compress(vmdk1.read_bytes())
    chunk = 50_000
    files = (
        f'<File ovf:href="c.vmdk" ovf:id="file1" ovf:size="{len(chunked)}" ovf:chunkSize="{chunk}"/>'
        f'<File ovf:href="g.vmdk.gz" ovf:id="file2" ovf:size="{len(packed)}" ovf:compression="gzip"/>'
    )
    disks = (
        f'<Disk ovf:capacity="{3 * MiB}" ovf:diskId="d1" ovf:fileRef="file1"/>'
        f'<Disk ovf:capacity="{2 * MiB}" ovf:diskId="d2" ovf:fileRef="file2"/>'
    )
    text = vbox_descriptor([], []).replace(b"<References></References>", f"<References>{files}</References>".encode())
    text = text.replace(b"</Info></DiskSection>", f"</Info>{disks}</DiskSection>".encode())
    pieces = [(f"c.vmdk.{i // chunk:09d}", chunked[i : i + chunk]) for i in range(0, len(chunked), chunk)]
    members = [("x.ovf", text), *pieces, ("g.vmdk.gz", packed)]
    make_tar(tmp_path / "x.ova", [members[0], ("x.mf", manifest(members)), *members[1:]])
    imported = asyncio.run(import_all(tmp_path / "x.ova", tmp_path))
    assert [sha256_file(p) for _, p in imported] == [sha256_file(raw0), sha256_file(raw1)]


async def test_gunzip_source_refuses_endless_seeking(tmp_path: Path) -> None:
    data = random.Random(1).randbytes(12 * MiB)
    (tmp_path / "z").write_bytes(gzip.compress(data, 1))
    inner = await FileSource.open(str(tmp_path / "z"))
    with Workers() as workers:
        source = await GunzipSource.open(inner, workers, limit=64 * MiB)
        assert source.size == len(data)
        assert await source.read_at(11 * MiB, 10) == data[11 * MiB : 11 * MiB + 10]
        with pytest.raises(UnsupportedImage) as info:
            for _ in range(GunzipSource.MAX_RESTARTS + 1):
                assert await source.read_at(0, 5) == data[:5]
                await source.read_at(9 * MiB, 5)
        assert info.value.reason == "ova.gzip_seek"
        with pytest.raises(UnsupportedImage, match="more than"):
            await GunzipSource.open(inner, workers, limit=MiB)
    await inner.close()


async def test_concat_and_slice_sources(tmp_path: Path) -> None:
    data = bytes(range(256)) * 100
    (tmp_path / "f").write_bytes(data)
    source = await FileSource.open(str(tmp_path / "f"))
    parts: list[Source] = [
        SliceSource(source, 10, 1000, "a"),
        SliceSource(source, 5000, 3, "b"),
        SliceSource(source, 6000, 500, "c"),
    ]
    concat = ConcatSource(parts, "all")
    expected = data[10:1010] + data[5000:5003] + data[6000:6500]
    assert concat.size == len(expected)
    for offset, length in [(0, 2000), (995, 10), (1003, 1), (1502, 100), (1503, 5)]:
        assert await concat.read_at(offset, length) == expected[offset : offset + length]
    with pytest.raises(CorruptImage):
        SliceSource(source, 25001, 600, "past the end")
    await source.close()


# --- refusals ------------------------------------------------------------------------------------


def small_package(tmp_path: Path) -> tuple[bytes, bytes]:
    _, vmdk = make_disk(tmp_path, "a", MiB, 2)
    data = vmdk.read_bytes()
    return vmware_descriptor([("a.vmdk", MiB, len(data))]), data


def refuse(path: Path, tmp_path: Path) -> ImageError:
    with pytest.raises(ImageError) as info:
        convert_file(path, tmp_path / "out.raw", "raw")
    assert not list(leftovers(tmp_path))
    return info.value


def test_single_chunk_under_its_plain_name(tmp_path: Path) -> None:
    text, data = small_package(tmp_path)
    chunked = text.replace(b'ovf:href="a.vmdk"', b'ovf:href="a.vmdk" ovf:chunkSize="7516192768"')
    make_tar(tmp_path / "x.ova", [("x.ovf", chunked), ("a.vmdk", data)])
    assert convert_file(tmp_path / "x.ova", tmp_path / "x.raw", "raw").source.virtual_size == MiB


def test_disk_to_create_reads_as_zeros_after_the_boot_disk(tmp_path: Path) -> None:
    text, data = small_package(tmp_path)
    empty = b'<Disk ovf:capacity="3" ovf:capacityAllocationUnits="byte * 2^20" ovf:diskId="scratch"/>'
    text = text.replace(b"</DiskSection>", empty + b"</DiskSection>")
    make_tar(tmp_path / "x.ova", [("x.ovf", text), ("a.vmdk", data)])
    imported = asyncio.run(import_all(tmp_path / "x.ova", tmp_path))
    assert [href for href, _ in imported] == ["a.vmdk", ""]
    assert imported[1][1].read_bytes() == bytes(3 * MiB)


def test_refusals(tmp_path: Path) -> None:
    text, data = small_package(tmp_path)
    sized = text.replace(f'ovf:size="{len(data)}"'.encode(), b'ovf:size="%d"')
    chunked = text.replace(b'ovf:href="a.vmdk"', b'ovf:href="a.vmdk" ovf:chunkSize="4096"')
    inner = tmp_path / "inner.tar"
    make_tar(inner, [("y.ovf", text)])
    cases: list[tuple[str, list[tuple[str, bytes]]]] = [
        ("ova.no_ovf", [("a.vmdk", data), ("x.ovf", text)]),
        ("ova.missing_file", [("x.ovf", text)]),
        ("ova.missing_file", [("x.ovf", text), ("x.mf", manifest([("x.ovf", text), ("b.vmdk", b"")]))]),
        ("ova.file_size", [("x.ovf", sized % 7), ("a.vmdk", data)]),
        ("ova.file_size", [("x.ovf", chunked), ("a.vmdk.000000000", data[:1000]), ("a.vmdk.000000001", data[1000:])]),
        ("ova.file_size", [("x.ovf", chunked), ("a.vmdk", data)]),
        ("ovf.href", [("x.ovf", text.replace(b'ovf:href="a.vmdk"', b'ovf:href="../a.vmdk"')), ("a.vmdk", data)]),
        ("ova.duplicate_member", [("x.ovf", text), ("a.vmdk", data), ("./a.vmdk", data)]),
        ("format.unknown", [("x.ovf", sized % 4), ("a.vmdk", b"ABCD")]),
        ("ova.nested", [("x.ovf", sized % inner.stat().st_size), ("a.vmdk", inner.read_bytes())]),
    ]
    for number, (reason, members) in enumerate(cases):
        path = tmp_path / f"{number}.ova"
        make_tar(path, members)
        assert refuse(path, tmp_path).reason == reason, reason


@pytest.mark.parametrize(
    ("kind", "flag"),
    [
        ("symlink", tarfile.SYMTYPE),
        ("hard link", tarfile.LNKTYPE),
        ("device", tarfile.BLKTYPE),
        ("fifo", tarfile.FIFOTYPE),
    ],
)
def test_links_and_devices_refused(tmp_path: Path, kind: str, flag: bytes) -> None:
    text, data = small_package(tmp_path)
    path = tmp_path / "x.ova"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, content in [("x.ovf", text), ("a.vmdk", data)]:
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
        special = tarfile.TarInfo("evil")
        special.type, special.linkname = flag, "/etc/passwd"
        tar.addfile(special)
    assert refuse(path, tmp_path).reason == "ova.member_type"


def test_truncated_and_unpadded_archives(tmp_path: Path) -> None:
    text, data = small_package(tmp_path)
    make_tar(tmp_path / "x.ova", [("x.ovf", text), ("a.vmdk", data)])
    whole = (tmp_path / "x.ova").read_bytes()
    end = 512 + len(text) + (-len(text) % 512) + 512 + len(data)
    (tmp_path / "cut.ova").write_bytes(whole[:end])  # no padding, no end blocks: still an OVA
    result = convert_file(tmp_path / "cut.ova", tmp_path / "cut.raw", "raw")
    assert result.source.virtual_size == MiB
    (tmp_path / "short.ova").write_bytes(whole[: end - 1])
    assert refuse(tmp_path / "short.ova", tmp_path).reason == "ova.truncated"
    damaged = bytearray(whole)
    damaged[512 + len(text) + (-len(text) % 512) + 5] ^= 0x55  # inside the second header's name
    (tmp_path / "bad.ova").write_bytes(bytes(damaged))
    assert refuse(tmp_path / "bad.ova", tmp_path).reason == "ova.tar_checksum"


@pytest.mark.parametrize("row", corpus_params("reject", formats=("OVA", "TAR", "PNG")))
def test_corpus_packages_refused(row: dict[str, Any], corpus_cache: Path, tmp_path: Path) -> None:
    error = refuse(corpus_file(row, corpus_cache), tmp_path)
    assert error.reason in ("ova.no_ovf", "ova.missing_file", "ovf.xml", "format.unknown"), error


def test_tar_number_fields() -> None:
    assert ova.parse_number(b"00000001750\x00", "size") == 1000
    assert ova.parse_number(b"1750 \x00      ", "size") == 1000
    assert ova.parse_number(b"\x80" + (20 << 30).to_bytes(11, "big"), "size") == 20 << 30
    for bad in (b"\xff" * 12, b"12x4\x00"):
        with pytest.raises(CorruptImage):
            ova.parse_number(bad, "size")
    header = ova.tar_header("big.vmdk", 20 << 30, 0)
    assert ova.is_tar_header(header) and ova.parse_header(header, 0) == ova.TarHeader("big.vmdk", 20 << 30, b"0", "")
    assert ova.pax_records(b"18 path=a/b/c.ovf\n\x00\x00") == {"path": "a/b/c.ovf"}
    with pytest.raises(CorruptImage):
        ova.pax_records(b"99 path=x\n")


def test_probe_takes_any_ustar_archive(tmp_path: Path) -> None:
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT):
        make_tar(tmp_path / "t.tar", [("a.bin", b"x")], fmt)
        head = (tmp_path / "t.tar").read_bytes()[:65536]
        assert ova.OvaReader.probe(head, b"", len(head))
    assert not ova.OvaReader.probe(b"\x89PNG" + bytes(600), b"", 604)
    assert not ova.OvaReader.probe(bytes(1024), b"", 1024)
    with pytest.raises(CorruptImage):
        ova.pax_size("9" * 30, 0)


# --- writing -------------------------------------------------------------------------------------


def extract(path: Path, tmp: Path) -> dict[str, Path]:
    names = subprocess.run(["tar", "-tf", path], check=True, capture_output=True, text=True).stdout.split()
    subprocess.run(["tar", "-xf", path, "-C", tmp], check=True)
    return {name: tmp / name for name in names}


def test_round_trip_raw_ova_raw(tmp_path: Path) -> None:
    raw, _ = make_disk(tmp_path, "src", 9 * MiB + 4096, 7)
    convert_file(raw, tmp_path / "out.ova", "ova", input_format="raw")
    out = tmp_path / "x"
    out.mkdir()
    members = extract(tmp_path / "out.ova", out)
    assert list(members) == ["out.ovf", "out.mf", "out-disk1.vmdk"]
    qemu_img("check", members["out-disk1.vmdk"])
    qemu_img("compare", members["out-disk1.vmdk"], raw)
    for entry in ovf.parse_manifest(members["out.mf"].read_bytes()).values():
        ovf.check_digest(entry, sha256_file(members[entry.name]))
    parsed = ovf.parse_descriptor(members["out.ovf"].read_bytes())
    assert parsed.files["file1"].size == members["out-disk1.vmdk"].stat().st_size
    convert_file(tmp_path / "out.ova", tmp_path / "back.raw", "raw")
    assert sha256_file(tmp_path / "back.raw") == sha256_file(raw)


async def stream_of(path: Path, workers: Workers) -> tuple[int, AsyncIterator[Extent]]:
    reader = await RawReader.open(await FileSource.open(str(path)), workers)
    return reader.virtual_size, reader.extents()


async def test_write_appliance_multi_disk_reads_back_in_order(tmp_path: Path) -> None:
    raws = [make_disk(tmp_path, f"m{i}", size, 10 + i)[0] for i, size in enumerate([2 * MiB, 3 * MiB + 512, MiB])]
    with Workers() as workers:
        disks = []
        for i, raw in enumerate(raws):
            size, extents = await stream_of(raw, workers)
            disks.append((f"app-disk{i + 1}.vmdk", size, extents))
        sink = await FileSink.create(str(tmp_path / "app.ova"))
        await ova.write_appliance(
            sink,
            disks,
            workers,
            ovf.Hardware(name="app", cpus=4, memory_mib=2048, controller="PIIX4"),
            adapter_type="ide",
        )
        await sink.commit()
    subprocess.run(["tar", "-tf", tmp_path / "app.ova"], check=True, capture_output=True)
    imported = await import_all(tmp_path / "app.ova", tmp_path)
    assert [href for href, _ in imported] == ["app-disk1.vmdk", "app-disk2.vmdk", "app-disk3.vmdk"]
    assert [sha256_file(p) for _, p in imported] == [sha256_file(r) for r in raws]


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**32), size=st.integers(1, 6 * MiB).map(lambda n: n - n % 512 or 512))
def test_round_trip_layouts(tmp_path_factory: pytest.TempPathFactory, seed: int, size: int) -> None:
    tmp = tmp_path_factory.mktemp("layout")
    raw = tmp / "r.raw"
    write_sparse_raw(raw, size, random_layout(random.Random(seed), size, 6), seed)
    convert_file(raw, tmp / "r.ova", "ova", input_format="raw")
    convert_file(tmp / "r.ova", tmp / "back.raw", "raw")
    assert sha256_file(tmp / "back.raw") == sha256_file(raw)


async def test_virtualbox_export_from_corpus_with_its_manifest(tmp_path: Path) -> None:
    names = ["ubuntu.2.0.ovf", "ubuntu.2.0.mf", "ubuntu.2.0-disk1.vmdk"]
    files = [CORPUS / "files/cot" / name for name in names]
    if not all(f.exists() for f in files):
        pytest.skip("corpus absent")
    make_tar(tmp_path / "u.ova", [(f.name, f.read_bytes()) for f in files])
    source = await FileSource.open(str(tmp_path / "u.ova"))
    with Workers() as workers:
        reader = await ova.OvaReader.open(source, workers)
        assert isinstance(reader, ova.OvaReader)
        kinds = {extent.kind async for extent in checked(reader.extents(), reader.virtual_size)}
        assert reader.virtual_size == 8 << 30 and kinds == {Kind.ZERO}
        assert [entry.name for entry, _ in reader.digests] == ["ubuntu.2.0-disk1.vmdk"]
        await reader.close()

"""OVF descriptors and manifests: the corpus, capacities, references, boot order, hostile XML, writing."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import CORPUS, corpus_file, corpus_params, corpus_path
from vmied.errors import CorruptImage, ImageError, UnsupportedImage, UsageError
from vmied.formats import ovf

ENVELOPE = (
    '<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" '
    'xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData">'
)


def descriptor(files: str, disks: str, items: str = "", extra: str = "") -> bytes:
    return (
        f'<?xml version="1.0"?>{ENVELOPE}<References>{files}</References>'
        f"<DiskSection><Info>d</Info>{disks}</DiskSection>{extra}"
        f'<VirtualSystem ovf:id="vm"><Info>v</Info><VirtualHardwareSection><Info>h</Info>{items}'
        "</VirtualHardwareSection></VirtualSystem></Envelope>"
    ).encode()


def item(**fields: object) -> str:
    return "<Item>" + "".join(f"<rasd:{k}>{v}</rasd:{k}>" for k, v in fields.items()) + "</Item>"


MIB = 1 << 20
ONE_FILE = '<File ovf:href="a.vmdk" ovf:id="f1"/>'


def disk(capacity: str = "1", units: str | None = "byte * 2^30", disk_id: str = "d1", ref: str = "f1") -> str:
    unit = f' ovf:capacityAllocationUnits="{units}"' if units else ""
    return f'<Disk ovf:capacity="{capacity}"{unit} ovf:diskId="{disk_id}" ovf:fileRef="{ref}"/>'


# --- corpus --------------------------------------------------------------------------------------


@pytest.mark.parametrize("row", corpus_params("descriptor", formats=("OVF 0", "OVF 1", "OVF 2")))
def test_corpus_descriptor_parses(row: dict[str, Any], corpus_cache: Path) -> None:
    parsed = ovf.parse_descriptor(corpus_file(row, corpus_cache).read_bytes())
    order = parsed.disk_order()
    assert order, "every corpus descriptor lists a disk"
    if row["virtual_size"] is not None:  # the corpus records the total of the disks
        assert sum(disk.capacity for disk, _ in order) == row["virtual_size"]


def test_corpus_capacities_in_mixed_units(corpus_cache: Path) -> None:
    parsed = ovf.parse_descriptor(corpus_path("govmomi-ovf/xp_deltaDisk__xp_deltaDisk.ovf").read_bytes())
    assert [d.capacity for d, _ in parsed.disk_order()] == [1536 << 20, 2 << 30, 1 << 30]


@pytest.mark.parametrize("row", corpus_params("descriptor", formats=("OVF MANIFEST",)))
def test_corpus_manifest_digests(row: dict[str, Any], corpus_cache: Path) -> None:
    path = corpus_file(row, corpus_cache)
    entries = ovf.parse_manifest(path.read_bytes())
    checked = 0
    for entry in entries.values():
        target = path.parent / entry.name
        if not target.exists():
            continue  # cot/input.mf lists an ISO and a config file the corpus does not hold
        ovf.check_digest(entry, hashlib.new(entry.algorithm.lower(), target.read_bytes()).hexdigest())
        checked += 1
    assert checked == 2


def test_manifest_mismatch_names_the_file() -> None:
    entries = ovf.parse_manifest(corpus_path("cot/ubuntu.2.0.mf").read_bytes())
    with pytest.raises(CorruptImage, match=r"ubuntu\.2\.0\.ovf") as info:
        ovf.check_digest(entries["ubuntu.2.0.ovf"], "0" * 64)
    assert info.value.reason == "ova.digest"


@pytest.mark.parametrize("row", corpus_params("reject", formats=("OVF",)))
def test_corpus_descriptor_rejected(row: dict[str, Any], corpus_cache: Path) -> None:
    with pytest.raises(ImageError) as info:
        ovf.parse_descriptor(corpus_file(row, corpus_cache).read_bytes())
    assert info.value.reason.startswith("ovf.")


def test_bom_and_versions() -> None:
    files = CORPUS / "files"
    if not files.exists():
        pytest.skip("corpus absent")
    bom = (files / "govmomi-ovf/2011OVFs__sunVHW-DiskTypes__sunVHW-DiskTypes_invalidUTF.ovf").read_bytes()
    assert bom.startswith(b"\xef\xbb\xbf")
    collection = ovf.parse_descriptor(bom)
    assert [s.id for s in collection.systems] == ["sunvhw-sas", "sunvhw-pv"]
    assert [d.id for d, _ in collection.disk_order()] == ["vmdisk1", "vmdisk2", "vmdisk3", "vmdisk4"]
    old = ovf.parse_descriptor((files / "cot/v0.9.ovf").read_bytes())
    assert old.version == "0.9" and old.disks["vmdisk1"].format.endswith("#sparse")
    assert old.systems[0].disk_ids == ("vmdisk1",)
    vbox = ovf.parse_descriptor((files / "cot/ubuntu.2.0.ovf").read_bytes())
    assert vbox.version == "2.x" and vbox.systems[0].os == ovf.OsHint(94, "Ubuntu_64")
    assert vbox.files["file1"].size is None


def test_deployment_option_and_property_capacity() -> None:
    parsed = ovf.parse_descriptor(corpus_path("govmomi-ovf/multiple_disks.ovf").read_bytes())
    assert parsed.configuration == "large"
    assert [d.id for d, _ in parsed.disk_order()] == ["system_large", "data_large", "extra_data_large", "scratch_large"]
    empty = ovf.parse_descriptor(corpus_path("govmomi-ovf/disk-capacity-property.ovf").read_bytes())
    assert empty.disks["vmdisk_data"].capacity == 5 << 30 and empty.disks["vmdisk_data"].file_ref is None


# --- capacities, references, limits --------------------------------------------------------------


@pytest.mark.parametrize(
    ("capacity", "units", "expected"),
    [
        ("1", "byte * 2^30", 1 << 30),
        ("8589934592", None, 8 << 30),
        ("1536", "byte*2^20", 1536 << 20),
        ("2", "byte * 10^9", 2 * 10**9),
        ("100", "MegaBytes", 100 << 20),
        ("94371840", "byte", 94371840),
    ],
)
def test_capacity_units(capacity: str, units: str | None, expected: int) -> None:
    parsed = ovf.parse_descriptor(descriptor(ONE_FILE, disk(capacity, units)))
    assert parsed.disks["d1"].capacity == expected


@pytest.mark.parametrize(
    ("capacity", "units", "reason"),
    [
        ("${size}", "byte", "ovf.capacity"),
        ("abc", "byte", "ovf.number"),
        ("0", "byte", "ovf.capacity"),
        ("1", "byte * 2^70", "ovf.units"),
        ("1", "bit", "ovf.units"),
        ("1" * 30, "byte", "ovf.number"),
        ("65", "byte * 2^40", "ovf.capacity"),
    ],
)
def test_bad_capacity_refused(capacity: str, units: str, reason: str) -> None:
    with pytest.raises(ImageError) as info:
        ovf.parse_descriptor(descriptor(ONE_FILE, disk(capacity, units)))
    assert info.value.reason == reason


def test_property_capacity_resolved_from_product_section() -> None:
    product = (
        '<VirtualSystem ovf:id="p"><Info>x</Info><ProductSection ovf:class="org.x"><Info>p</Info>'
        '<Property ovf:key="size" ovf:type="int" ovf:value="3"/></ProductSection></VirtualSystem>'
    )
    parsed = ovf.parse_descriptor(descriptor(ONE_FILE, disk("${org.x.size}"), extra=product))
    assert parsed.disks["d1"].capacity == 3 << 30


@pytest.mark.parametrize("href", ["../a.vmdk", "/etc/passwd", "http://x/a.vmdk", "dir/a.vmdk", "a\\b", ""])
def test_href_outside_package_refused(href: str) -> None:
    with pytest.raises(UnsupportedImage) as info:
        ovf.parse_descriptor(descriptor(f'<File ovf:href="{href}" ovf:id="f1"/>', disk()))
    assert info.value.reason == "ovf.href"


@pytest.mark.parametrize(
    ("files", "disks", "reason"),
    [
        (ONE_FILE + ONE_FILE.replace("a.vmdk", "b.vmdk"), disk(), "ovf.duplicate"),
        (ONE_FILE + ONE_FILE.replace('"f1"', '"f2"'), disk(), "ovf.duplicate"),
        (ONE_FILE, disk() + disk(ref="f1"), "ovf.duplicate"),
        (ONE_FILE, disk(ref="nope"), "ovf.file_ref"),
        (ONE_FILE, disk().replace("/>", ' ovf:parentRef="d0"/>'), "ovf.delta"),
        (ONE_FILE.replace("/>", ' ovf:compression="bzip2"/>'), disk(), "ovf.compression"),
        (ONE_FILE.replace("/>", ' ovf:size="-1"/>'), disk(), "ovf.number"),
    ],
)
def test_inconsistent_descriptor_refused(files: str, disks: str, reason: str) -> None:
    with pytest.raises(ImageError) as info:
        ovf.parse_descriptor(descriptor(files, disks))
    assert info.value.reason == reason


def test_chunked_gzip_file_attributes() -> None:
    files = '<File ovf:href="a.vmdk.gz" ovf:id="f1" ovf:size="10" ovf:compression="gzip" ovf:chunkSize="4"/>'
    parsed = ovf.parse_descriptor(descriptor(files, disk()))
    assert parsed.files["f1"] == ovf.OvfFile("f1", "a.vmdk.gz", 10, "gzip", 4)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"<Envelope", "ovf.xml"),
        (b"", "ovf.xml"),
        (b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">]><Envelope>&a;</Envelope>', "ovf.dtd"),
        (b'<!DOCTYPE x SYSTEM "file:///etc/passwd"><Envelope/>', "ovf.dtd"),
        (b"<Envelope/>", "ovf.envelope"),
        (b'<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1"/>', "ovf.no_system"),
        (b"<html/>", "ovf.envelope"),
        (b" " * (ovf.MAX_DESCRIPTOR + 1), "ovf.limits"),
    ],
)
def test_hostile_xml_refused(data: bytes, reason: str) -> None:
    with pytest.raises(ImageError) as info:
        ovf.parse_descriptor(data)
    assert info.value.reason == reason


def test_too_many_disks_refused() -> None:
    disks = "".join(disk(disk_id=f"d{i}", ref="f1") for i in range(ovf.MAX_DISKS + 1))
    with pytest.raises(UnsupportedImage, match="at most"):
        ovf.parse_descriptor(descriptor(ONE_FILE, disks))


# --- boot order ----------------------------------------------------------------------------------


def test_boot_order_by_controller_kind_and_address() -> None:
    files = "".join(f'<File ovf:href="{n}.vmdk" ovf:id="{n}"/>' for n in "abcd")
    disks = "".join(disk(disk_id=n, ref=n) for n in "abcd")
    items = (
        item(InstanceID=3, ResourceType=6, Address=0)  # SCSI
        + item(InstanceID=4, ResourceType=5, Address=1)  # IDE 1
        + item(InstanceID=5, ResourceType=5, Address=0)  # IDE 0
        + item(InstanceID=6, ResourceType=17, Parent=3, AddressOnParent=1, HostResource="ovf:/disk/a")
        + item(InstanceID=7, ResourceType=17, Parent=3, AddressOnParent=0, HostResource="ovf:/disk/b")
        + item(InstanceID=8, ResourceType=17, Parent=4, AddressOnParent=0, HostResource="ovf:/disk/c")
        + item(InstanceID=9, ResourceType=17, Parent=5, AddressOnParent=1, HostResource="/disk/d")
    )
    parsed = ovf.parse_descriptor(descriptor(files, disks, items))
    assert parsed.systems[0].disk_ids == ("d", "c", "b", "a")
    assert [d.id for d, _ in parsed.disk_order()] == ["d", "c", "b", "a"]


def test_hardware_naming_unknown_disk_refused() -> None:
    items = item(InstanceID=6, ResourceType=17, HostResource="ovf:/disk/ghost")
    with pytest.raises(CorruptImage) as info:
        ovf.parse_descriptor(descriptor(ONE_FILE, disk(), items))
    assert info.value.reason == "ovf.disk_ref"


def test_unattached_disks_follow_attached_ones() -> None:
    files = ONE_FILE + '<File ovf:href="b.vmdk" ovf:id="f2"/>'
    items = item(InstanceID=6, ResourceType=17, HostResource="ovf:/disk/d2")
    parsed = ovf.parse_descriptor(descriptor(files, disk() + disk(disk_id="d2", ref="f2"), items))
    assert [d.id for d, _ in parsed.disk_order()] == ["d2", "d1"]


# --- manifest syntax -----------------------------------------------------------------------------


def test_manifest_line_syntaxes() -> None:
    sha1, sha256 = "a" * 40, "B" * 64
    entries = ovf.parse_manifest(f"\ufeffSHA1(x.ovf)= {sha1}\r\n\nSHA256 (disk 1.vmdk) = {sha256}\n".encode())
    assert entries == {
        "x.ovf": ovf.ManifestEntry("SHA1", "x.ovf", sha1),
        "disk 1.vmdk": ovf.ManifestEntry("SHA256", "disk 1.vmdk", sha256.lower()),
    }


@pytest.mark.parametrize(
    "text",
    [
        "MD5(x)= " + "a" * 32,
        "SHA1(x)= " + "a" * 39,
        "SHA256(x)= " + "g" * 64,
        "garbage",
        "SHA1(x)= " + "a" * 40 + "\nSHA1(x)= " + "a" * 40,
    ],
)
def test_bad_manifest_refused(text: str) -> None:
    with pytest.raises(CorruptImage) as info:
        ovf.parse_manifest(text.encode())
    assert info.value.reason == "ova.manifest"


# --- writing -------------------------------------------------------------------------------------


def test_written_descriptor_parses_back() -> None:
    specs = [ovf.DiskSpec("vm-disk1.vmdk", 10 << 20, 4096), ovf.DiskSpec("vm-disk2.vmdk", 1 << 30, 512, 0)]
    text = ovf.build_descriptor(ovf.Hardware(name="a&b"), specs)
    parsed = ovf.parse_descriptor(ovf.padded(text, len(text) + 1000))
    assert parsed.version == "1.x"
    assert [(d.id, d.capacity, parsed.files[d.file_ref or ""].href) for d, _ in parsed.disk_order()] == [
        ("vmdisk1", 10 << 20, "vm-disk1.vmdk"),
        ("vmdisk2", 1 << 30, "vm-disk2.vmdk"),
    ]
    system = parsed.systems[0]
    assert (system.id, system.cpus, system.memory_bytes) == ("a&b", 2, 4 << 30)
    assert system.os == ovf.OsHint(102, "otherGuest64")


def test_written_items_list_rasd_fields_alphabetically() -> None:
    text = ovf.build_descriptor(ovf.Hardware(controller="PIIX4"), [ovf.DiskSpec("d.vmdk", 1 << 20, 512)])
    root = ovf.parse_xml(text)
    items = [i for i in root.iter() if ovf.local(i.tag) == "Item"]
    assert len(items) == 5
    for element in items:
        names = [ovf.local(child.tag) for child in element]
        assert names == sorted(names)
    assert ovf.parse_descriptor(text).systems[0].disk_ids == ("vmdisk1",)


def test_padding_is_exact() -> None:
    assert ovf.padded(b"<a/>", 10) == b"<a/>     \n"
    assert ovf.padded(b"<a/>", 4) == b"<a/>"
    with pytest.raises(ValueError):
        ovf.padded(b"<a/>", 3)


@pytest.mark.parametrize(("controller", "count"), [("PIIX4", 4), ("lsilogic", 9)])
def test_written_disks_fit_their_controllers_in_boot_order(controller: str, count: int) -> None:
    specs = [ovf.DiskSpec(f"d{i}.vmdk", MIB, 512) for i in range(count)]
    text = ovf.build_descriptor(ovf.Hardware(controller=controller), specs)
    items = [i for i in ovf.parse_xml(text).iter() if ovf.local(i.tag) == "Item"]
    units = [ovf.field_text(i, "AddressOnParent") for i in items if ovf.field_text(i, "ResourceType") == "17"]
    assert "7" not in units if controller == "lsilogic" else units == ["0", "1", "0", "1"]
    parsed = ovf.parse_descriptor(text)
    assert parsed.systems[0].disk_ids == tuple(f"vmdisk{i + 1}" for i in range(count))


def test_too_many_disks_for_ide_refused() -> None:
    with pytest.raises(UsageError, match="at most 4"):
        ovf.build_descriptor(ovf.Hardware(controller="PIIX4"), [ovf.DiskSpec(f"d{i}", MIB, 1) for i in range(5)])
    assert len(ovf.disk_slots(True, 30)) == 30

"""OVF descriptors and manifests: parsing (pure functions over bytes) and writing.

Specs: DMTF DSP0243 (OVF 1.0.0, 1.1.0, 2.0.1) and VMware's pre-DMTF OVF 0.9 (``Section``/``Content``
elements typed with ``xsi:type``). The parts of a descriptor vmied uses::

    Envelope                                   ovf:version; namespace tells 0.9 / 1.x / 2.x
    ├── References
    │   └── File  ovf:id ovf:href [ovf:size] [ovf:compression="gzip"] [ovf:chunkSize]
    ├── DiskSection                            (0.9: Section xsi:type="ovf:DiskSection_Type")
    │   └── Disk  ovf:diskId ovf:capacity [ovf:capacityAllocationUnits] [ovf:fileRef]
    │             [ovf:format] [ovf:populatedSize] [ovf:parentRef: a delta disk, refused]
    └── VirtualSystem | VirtualSystemCollection (nested)   (0.9: Content xsi:type=...)
        ├── ProductSection/Property  ovf:key ovf:value     (defaults for ${key} capacities)
        ├── OperatingSystemSection   ovf:id (CIM OS id) [vmw:osType] [Description] [vbox:OSType]
        └── VirtualHardwareSection
            └── Item | StorageItem | EthernetPortItem    rasd:/sasd: InstanceID ResourceType
                  Address Parent AddressOnParent HostResource ("ovf:/disk/<diskId>")
                  VirtualQuantity AllocationUnits

The boot disk is the first disk in :func:`boot_order`: controllers in the order a PC BIOS tries them
(IDE, then SATA, then SCSI, then anything else), each by its Address, disks by AddressOnParent.

Manifest (DSP0243 §5.1): one line per file, ``SHA256(name)= hex`` or ``SHA256 (name) = hex``
(SHA1 and SHA512 also).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TypeVar

import defusedxml.ElementTree as SafeET
from defusedxml import DefusedXmlException

from ..errors import CorruptImage, UnsupportedImage, UsageError
from ..io.base import check_sibling_name

# XML escaping (what xml.sax.saxutils does, without its import of urllib.request: ~20 ms of a
# local conversion's start-up). Attribute values keep tabs and line ends as character references.
_XML_TEXT = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;"})
_XML_ATTRIBUTE = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;",
                                "\n": "&#10;", "\r": "&#13;", "\t": "&#9;"})


def escape(text: str) -> str:
    return text.translate(_XML_TEXT)


def quoteattr(text: str) -> str:
    return '"' + text.translate(_XML_ATTRIBUTE) + '"'


# --- Constants ---------------------------------------------------------------------------------

NS_OVF_09 = "http://www.vmware.com/schema/ovf/1/envelope"
NS_OVF_1 = "http://schemas.dmtf.org/ovf/envelope/1"
NS_OVF_2 = "http://schemas.dmtf.org/ovf/envelope/2"
NS_RASD = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
NS_VSSD = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData"
NS_VMW = "http://www.vmware.com/schema/ovf"
NS_XSI = "http://www.w3.org/2001/XMLSchema-instance"
ENVELOPE_VERSIONS = {NS_OVF_09: "0.9", NS_OVF_1: "1.x", NS_OVF_2: "2.x"}

#: CIM ResourceType values (DSP1041 / CIM_ResourceAllocationSettingData).
RT_CPU, RT_MEMORY, RT_IDE, RT_SCSI, RT_NIC, RT_DISK, RT_OTHER_STORAGE = 3, 4, 5, 6, 10, 17, 20
#: Boot priority of a disk's controller kind (lower boots first); see the module docstring.
CONTROLLER_RANK = {RT_IDE: 0, RT_OTHER_STORAGE: 1, RT_SCSI: 2}

#: A descriptor larger than this is not an OVF anyone wrote (the largest real ones hold EULAs).
MAX_DESCRIPTOR = 16 << 20
MAX_MANIFEST = 1 << 20
MAX_FILES = 4096
MAX_DISKS = 256
#: Largest disk vmied accepts from a descriptor (the VMDK limit is just under 64 TiB).
MAX_CAPACITY = 64 << 40

DIGEST_LENGTHS = {"SHA1": 40, "SHA256": 64, "SHA512": 128}
_MANIFEST_LINE = re.compile(r"^(SHA1|SHA256|SHA512)\s*\((.+)\)\s*=\s*([0-9A-Fa-f]+)\s*$")
_UNITS = re.compile(r"^byte(?:\s*\*\s*(2|10)\s*\^\s*(\d{1,2}))?$")
_OLD_UNITS = {"bytes": 1, "kilobytes": 1 << 10, "megabytes": 1 << 20, "gigabytes": 1 << 30}
_PROPERTY_REF = re.compile(r"^\$\{([A-Za-z0-9_.\-]+)\}$")


# --- Model -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OvfFile:
    id: str
    href: str
    size: int | None = None
    compression: str = ""  # "" or "gzip"
    chunk_size: int | None = None


@dataclass(frozen=True)
class OvfDisk:
    id: str
    capacity: int
    file_ref: str | None  # None: an empty disk the importer creates
    format: str = ""  # the format URI as written (VirtualBox's old ones end in "#sparse")
    populated_size: int | None = None


@dataclass(frozen=True)
class OsHint:
    cim_id: int | None
    name: str  # vmw:osType, vbox:OSType or the Description, whichever the descriptor has


@dataclass(frozen=True)
class VirtualSystem:
    id: str
    os: OsHint | None
    cpus: int | None
    memory_bytes: int | None
    disk_ids: tuple[str, ...]  # disks attached in the chosen deployment option, in boot order
    mentioned: frozenset[str]  # disks any deployment option attaches


@dataclass(frozen=True)
class Descriptor:
    version: str
    configuration: str | None  # the deployment option in force (DeploymentOptionSection)
    files: dict[str, OvfFile]
    disks: dict[str, OvfDisk]
    systems: tuple[VirtualSystem, ...]

    def disk_order(self) -> list[tuple[OvfDisk, VirtualSystem | None]]:
        """Every disk once: each system's in boot order, then disks that no hardware names at all."""
        out: list[tuple[OvfDisk, VirtualSystem | None]] = []
        seen: set[str] = set()
        for system in self.systems:
            for disk_id in system.disk_ids:
                if disk_id not in seen:
                    seen.add(disk_id)
                    out.append((self.disks[disk_id], system))
        mentioned = set().union(*(system.mentioned for system in self.systems))
        out += [(disk, None) for disk_id, disk in self.disks.items() if disk_id not in mentioned]
        return out


@dataclass(frozen=True)
class ManifestEntry:
    algorithm: str  # "SHA1", "SHA256" or "SHA512"
    name: str
    digest: str  # lower-case hex


# --- Safety checks -----------------------------------------------------------------------------


def _refuse(message: str, reason: str) -> UnsupportedImage:
    return UnsupportedImage(message, reason=f"ovf.{reason}")


def _corrupt(message: str, reason: str) -> CorruptImage:
    return CorruptImage(message, reason=f"ovf.{reason}")


def check_href(href: str) -> str:
    """A File href must name a member of the package: no directories, ``..``, absolute paths or URLs."""
    try:
        return check_sibling_name(href)
    except UnsupportedImage:
        raise _refuse(f"OVF File href {href!r} points outside the package", "href") from None


def check_count(what: str, count: int, limit: int) -> None:
    if count > limit:
        raise _refuse(f"OVF descriptor lists {count} {what}; at most {limit} are accepted", "limits")


def parse_int(text: str | None, what: str, limit: int = 1 << 62) -> int:
    """A non-negative decimal integer attribute, bounded."""
    if text is None or not text.strip().isdigit() or len(text.strip()) > 20:
        raise _corrupt(f"OVF {what} {text!r} is not a whole number", "number")
    value = int(text)
    if value > limit:
        raise _refuse(f"OVF {what} {value} is larger than {limit}", "limits")
    return value


def allocation_unit(units: str | None) -> int:
    """Bytes per unit of ``capacityAllocationUnits``: ``byte``, ``byte * 2^30``, old ``MegaBytes``."""
    if units is None or not units.strip():
        return 1
    text = units.strip()
    if text.lower() in _OLD_UNITS:
        return _OLD_UNITS[text.lower()]
    match = _UNITS.match(text)
    if match is None:
        raise _refuse(f"OVF capacity unit {units!r} is not a byte unit vmied understands", "units")
    if match.group(1) is None:
        return 1
    base, exponent = int(match.group(1)), int(match.group(2))
    if base**exponent > MAX_CAPACITY:
        raise _refuse(f"OVF capacity unit {units!r} is too large", "units")
    return int(base**exponent)


def check_capacity(disk_id: str, capacity: int) -> int:
    if not 0 < capacity <= MAX_CAPACITY:
        raise _refuse(
            f"OVF disk {disk_id} has capacity {capacity} bytes (must be 1 byte to {MAX_CAPACITY >> 40} TiB)",
            "capacity",
        )
    return capacity


# --- XML helpers -------------------------------------------------------------------------------


def parse_xml(data: bytes) -> ET.Element:
    """Parse untrusted XML: no DTDs, no entities, no external references; a leading BOM is fine."""
    if len(data) > MAX_DESCRIPTOR:
        raise _refuse(f"OVF descriptor of {len(data)} bytes is larger than {MAX_DESCRIPTOR}", "limits")
    try:
        root: ET.Element = SafeET.fromstring(data, forbid_dtd=True)
    except DefusedXmlException as exc:
        raise _refuse(f"OVF descriptor uses a DTD or entities, which are refused: {exc}", "dtd") from None
    except ET.ParseError as exc:
        raise _corrupt(f"OVF descriptor is not well-formed XML: {exc}", "xml") from None
    return root


def local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def attr(elem: ET.Element, ns: str, name: str) -> str | None:
    """An attribute in the OVF namespace, or unqualified (some writers drop the prefix)."""
    return elem.get(f"{{{ns}}}{name}", elem.get(name))


def kind(elem: ET.Element) -> str:
    """The section or content kind: the element name, or OVF 0.9's ``xsi:type`` minus ``_Type``."""
    name = local(elem.tag)
    if name in ("Section", "Content"):
        xsi_type = elem.get(f"{{{NS_XSI}}}type", "")
        return xsi_type.split(":")[-1].removesuffix("_Type")
    return name


def children(elem: ET.Element, name: str) -> Iterator[ET.Element]:
    return (child for child in elem if kind(child) == name)


def field_text(item: ET.Element, name: str) -> str | None:
    """A RASD/SASD field by local name, case-insensitively (OVF 0.9 writes ``InstanceId``)."""
    wanted = name.lower()
    for child in item:
        if local(child.tag).lower() == wanted:
            return (child.text or "").strip()
    return None


# --- Descriptor parsing ------------------------------------------------------------------------


def envelope_version(root: ET.Element) -> tuple[str, str]:
    """``(namespace, version)`` of the Envelope, or refuse what is not an OVF envelope."""
    ns = root.tag[1:].split("}")[0] if root.tag.startswith("{") else ""
    if local(root.tag) != "Envelope" or ns not in ENVELOPE_VERSIONS:
        raise _refuse(f"not an OVF descriptor: root element is {root.tag!r}", "envelope")
    return ns, ENVELOPE_VERSIONS[ns]


def parse_file(elem: ET.Element, ns: str) -> OvfFile:
    file_id, href = attr(elem, ns, "id"), attr(elem, ns, "href")
    if not file_id or href is None:
        raise _corrupt("OVF File element without ovf:id or ovf:href", "file")
    size = attr(elem, ns, "size")
    chunk = attr(elem, ns, "chunkSize")
    compression = attr(elem, ns, "compression") or ""
    if compression not in ("", "identity", "gzip"):
        raise _refuse(f"OVF File {href} uses compression {compression!r} (only gzip is supported)", "compression")
    return OvfFile(
        id=file_id,
        href=check_href(href),
        size=None if size is None else parse_int(size, f"File {href} size"),
        compression="" if compression == "identity" else compression,
        chunk_size=None if chunk is None else parse_int(chunk, f"File {href} chunkSize") or None,
    )


def product_properties(root: ET.Element, ns: str) -> dict[str, str]:
    """ProductSection property defaults, keyed by ``key`` and ``class.key`` (DSP0243 §9.5)."""
    values: dict[str, str] = {}
    for section in root.iter():
        if kind(section) != "ProductSection":
            continue
        cls = attr(section, ns, "class")
        for prop in children(section, "Property"):
            key, value = attr(prop, ns, "key"), attr(prop, ns, "value")
            if key and value is not None:
                values.setdefault(key, value)
                if cls:
                    values.setdefault(f"{cls}.{key}", value)
    return values


def resolve_capacity(disk_id: str, text: str | None, properties: dict[str, str]) -> str | None:
    """Replace a ``${key}`` capacity by the property's default value, or refuse."""
    match = _PROPERTY_REF.match((text or "").strip())
    if match is None:
        return text
    key = match.group(1)
    if key not in properties:
        raise _refuse(f"OVF disk {disk_id} capacity {text} names a property with no default value", "capacity")
    return properties[key]


def parse_disk(elem: ET.Element, ns: str, properties: dict[str, str]) -> OvfDisk:
    disk_id = attr(elem, ns, "diskId")
    if not disk_id:
        raise _corrupt("OVF Disk element without ovf:diskId", "disk")
    if attr(elem, ns, "parentRef"):
        raise _refuse(f"OVF disk {disk_id} is a delta disk (parentRef); delta disks are not supported", "delta")
    capacity_text = resolve_capacity(disk_id, attr(elem, ns, "capacity"), properties)
    units = allocation_unit(attr(elem, ns, "capacityAllocationUnits"))
    capacity = parse_int(capacity_text, f"disk {disk_id} capacity", MAX_CAPACITY) * units
    populated = attr(elem, ns, "populatedSize")
    return OvfDisk(
        id=disk_id,
        capacity=check_capacity(disk_id, capacity),
        file_ref=attr(elem, ns, "fileRef") or None,
        format=attr(elem, ns, "format") or "",
        populated_size=None if populated is None else parse_int(populated, f"disk {disk_id} populatedSize"),
    )


def disk_ref(host_resource: str | None) -> str | None:
    """The disk id of a HostResource: ``ovf:/disk/ID`` (1.x, 2.x) or ``/disk/ID`` (0.9, VirtualBox)."""
    if host_resource is None:
        return None
    for prefix in ("ovf:/disk/", "/disk/"):
        if host_resource.startswith(prefix):
            return host_resource[len(prefix) :]
    return None


def _number(text: str | None) -> int:
    """Sort key for Address fields: unparsable or absent ones go last."""
    return int(text) if text is not None and text.isdigit() and len(text) < 10 else 1 << 31


def boot_order(items: list[ET.Element], disks: dict[str, OvfDisk]) -> tuple[str, ...]:
    """Disk ids attached by ``items``, boot disk first (see the module docstring)."""
    controllers: dict[str, tuple[int, int, int]] = {}
    for index, item in enumerate(items):
        rtype = _number(field_text(item, "ResourceType"))
        instance = field_text(item, "InstanceID")
        if rtype in CONTROLLER_RANK and instance is not None:
            controllers[instance] = (CONTROLLER_RANK[rtype], _number(field_text(item, "Address")), index)
    attached: list[tuple[tuple[int, int, int], int, int, str]] = []
    for index, item in enumerate(items):
        if _number(field_text(item, "ResourceType")) != RT_DISK:
            continue
        disk_id = disk_ref(field_text(item, "HostResource"))
        if disk_id is None:
            continue
        if disk_id not in disks:
            raise _corrupt(f"OVF hardware names disk {disk_id!r}, which DiskSection does not list", "disk_ref")
        controller = controllers.get(field_text(item, "Parent") or "", (len(CONTROLLER_RANK), 1 << 31, 1 << 31))
        attached.append((controller, _number(field_text(item, "AddressOnParent")), index, disk_id))
    return tuple(dict.fromkeys(disk_id for *_, disk_id in sorted(attached)))


def os_hint(system: ET.Element, ns: str) -> OsHint | None:
    for section in children(system, "OperatingSystemSection"):
        cim = attr(section, ns, "id")
        name = section.get(f"{{{NS_VMW}}}osType") or ""
        for child in section:
            if not name and local(child.tag) in ("OSType", "Description") and child.text:
                name = child.text.strip()
        return OsHint(_number(cim) if cim and cim.isdigit() and len(cim) < 10 else None, name[:256])
    return None


def default_configuration(root: ET.Element, ns: str) -> str | None:
    """The deployment option an importer uses unless told otherwise: the default, else the first."""
    options = [c for section in children(root, "DeploymentOptionSection") for c in children(section, "Configuration")]
    for option in options:
        if (attr(option, ns, "default") or "").lower() in ("true", "1"):
            return attr(option, ns, "id")
    return attr(options[0], ns, "id") if options else None


def hardware_items(system: ET.Element) -> list[ET.Element]:
    return [
        item
        for section in children(system, "VirtualHardwareSection")
        for item in section
        if local(item.tag).endswith("Item")
    ]


def selected(items: list[ET.Element], ns: str, configuration: str | None) -> list[ET.Element]:
    """The items in force: those for every deployment option, and those for ``configuration``."""
    return [
        item
        for item in items
        if attr(item, ns, "configuration") is None or configuration in (attr(item, ns, "configuration") or "").split()
    ]


def sizing(items: list[ET.Element]) -> tuple[int | None, int | None]:
    """The vCPU count and memory in bytes the items ask for, where given."""
    cpus = memory = None
    for item in items:
        rtype, quantity = _number(field_text(item, "ResourceType")), field_text(item, "VirtualQuantity")
        if quantity is None or not quantity.isdigit() or len(quantity) > 12:
            continue
        if rtype == RT_CPU and cpus is None:
            cpus = int(quantity)
        elif rtype == RT_MEMORY and memory is None:
            try:
                unit = allocation_unit(field_text(item, "AllocationUnits") or "byte * 2^20")
            except UnsupportedImage:
                continue  # hardware is informational: an odd unit only loses the memory size
            memory = int(quantity) * unit
    return cpus, memory


def virtual_systems(elem: ET.Element) -> Iterator[ET.Element]:
    """VirtualSystems in document order, inside any depth of VirtualSystemCollections."""
    for child in elem:
        if kind(child) == "VirtualSystem":
            yield child
        elif kind(child) == "VirtualSystemCollection":
            yield from virtual_systems(child)


def parse_system(elem: ET.Element, ns: str, disks: dict[str, OvfDisk], configuration: str | None) -> VirtualSystem:
    every = hardware_items(elem)
    items = selected(every, ns, configuration)
    cpus, memory = sizing(items)
    return VirtualSystem(
        attr(elem, ns, "id") or "",
        os_hint(elem, ns),
        cpus,
        memory,
        boot_order(items, disks),
        frozenset(boot_order(every, disks)),
    )


def check_references(files: dict[str, OvfFile], disks: dict[str, OvfDisk]) -> None:
    """Each disk's fileRef names a File (disks of different deployment options may share one)."""
    for disk in disks.values():
        if disk.file_ref is not None and disk.file_ref not in files:
            raise _corrupt(
                f"OVF disk {disk.id} refers to file {disk.file_ref!r}, which References does not list",
                "file_ref",
            )


T = TypeVar("T")


def unique(what: str, pairs: Iterator[tuple[str, T]]) -> dict[str, T]:
    out: dict[str, T] = {}
    for key, value in pairs:
        if key in out:
            raise _corrupt(f"OVF descriptor lists {what} {key!r} twice", "duplicate")
        out[key] = value
    return out


def parse_descriptor(data: bytes) -> Descriptor:
    """Parse and validate an OVF descriptor; refuse it with a named reason."""
    root = parse_xml(data)
    ns, version = envelope_version(root)
    file_elems = [f for refs in children(root, "References") for f in children(refs, "File")]
    disk_elems = [d for section in children(root, "DiskSection") for d in children(section, "Disk")]
    check_count("files", len(file_elems), MAX_FILES)
    check_count("disks", len(disk_elems), MAX_DISKS)
    files_list = [parse_file(f, ns) for f in file_elems]
    files = unique("File id", ((f.id, f) for f in files_list))
    unique("File href", ((f.href, f) for f in files_list))
    properties = product_properties(root, ns)
    disks = unique("disk id", ((d.id, d) for d in (parse_disk(e, ns, properties) for e in disk_elems)))
    check_references(files, disks)
    configuration = default_configuration(root, ns)
    systems = tuple(parse_system(s, ns, disks, configuration) for s in virtual_systems(root))
    if not systems:
        raise _corrupt("OVF descriptor has no VirtualSystem", "no_system")
    return Descriptor(version, configuration, files, disks, systems)


# --- Manifest ----------------------------------------------------------------------------------


def parse_manifest(data: bytes) -> dict[str, ManifestEntry]:
    """Parse a ``.mf``: ``ALG(name)= hex`` or ``ALG (name) = hex`` lines, keyed by file name."""
    if len(data) > MAX_MANIFEST:
        raise UnsupportedImage(f"OVA manifest of {len(data)} bytes is too large", reason="ova.manifest")
    entries: dict[str, ManifestEntry] = {}
    for number, raw in enumerate(data.decode("utf-8", "replace").lstrip("\ufeff").splitlines(), 1):
        if not raw.strip():
            continue
        match = _MANIFEST_LINE.match(raw.strip())
        if match is None or len(match.group(3)) != DIGEST_LENGTHS[match.group(1)]:
            raise CorruptImage(
                f"OVA manifest line {number} is not 'SHA256(name)= digest': {raw[:80]!r}",
                reason="ova.manifest",
            )
        name = match.group(2).strip()
        if name in entries:
            raise CorruptImage(f"OVA manifest lists {name!r} twice", reason="ova.manifest")
        entries[name] = ManifestEntry(match.group(1), name, match.group(3).lower())
    return entries


def check_digest(entry: ManifestEntry, actual: str) -> None:
    """Refuse a file whose digest differs from its manifest line, naming the file."""
    if actual.lower() != entry.digest:
        raise CorruptImage(
            f"OVA manifest {entry.algorithm} digest mismatch for {entry.name}: "
            f"manifest says {entry.digest}, content is {actual.lower()}",
            reason="ova.digest",
        )


def manifest_line(name: str, digest: str) -> bytes:
    return f"SHA256({name})= {digest}\n".encode()


# --- Descriptor writing ------------------------------------------------------------------------


@dataclass(frozen=True)
class DiskSpec:
    """One disk of an appliance being written."""

    href: str
    capacity: int
    file_size: int
    populated_size: int | None = None


@dataclass(frozen=True)
class Hardware:
    """What the written VirtualSystem asks for; the defaults boot any common OS."""

    name: str = "vm"
    cpus: int = 2
    memory_mib: int = 4096
    os_type: str = "otherGuest64"  # vmw:osType
    os_cim_id: int = 102  # CIM "Other 64-Bit"
    controller: str = "lsilogic"  # "lsilogic" (SCSI) or "PIIX4" (IDE)
    system_type: str = "vmx-10"  # vssd:VirtualSystemType: the hypervisor family the appliance is for


VMDK_STREAM_URI = "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"


def _item(fields: dict[str, str | int]) -> str:
    """A RASD Item; the CIM schema declares its elements in alphabetical order, so write them so."""
    body = "".join(f"        <rasd:{key}>{escape(str(value))}</rasd:{key}>\n" for key, value in sorted(fields.items()))
    return f"      <Item>\n{body}      </Item>\n"


#: InstanceIDs of the written controllers, by bus number (1, 2 and 4 are the CPU, memory and NIC).
CONTROLLER_IDS = (3, 5)
#: Disk units a controller offers: SCSI 0-15 without 7 (the initiator's own id), IDE master and slave.
SCSI_UNITS = tuple(unit for unit in range(16) if unit != 7)
IDE_UNITS = (0, 1)


def disk_slots(scsi: bool, count: int) -> list[tuple[int, int]]:
    """``(controller bus, unit)`` for each disk, boot disk first, filling bus 0 before bus 1."""
    units = SCSI_UNITS if scsi else IDE_UNITS
    slots = [(bus, unit) for bus in range(len(CONTROLLER_IDS)) for unit in units]
    if count > len(slots):
        kind = "SCSI" if scsi else "IDE"
        raise UsageError(f"an OVA with {kind} controllers holds at most {len(slots)} disks, not {count}")
    return slots[:count]


def build_descriptor(hardware: Hardware, disks: list[DiskSpec]) -> bytes:
    """An OVF 1.0 descriptor for one VirtualSystem with ``disks`` (boot disk first), VMware style."""
    scsi = hardware.controller == "lsilogic"
    files = "".join(
        f'    <File ovf:href={quoteattr(d.href)} ovf:id="file{i}" ovf:size="{d.file_size}"/>\n'
        for i, d in enumerate(disks, 1)
    )
    disk_lines = "".join(
        f'    <Disk ovf:capacity="{d.capacity}" ovf:capacityAllocationUnits="byte" ovf:diskId="vmdisk{i}" '
        f'ovf:fileRef="file{i}" ovf:format="{VMDK_STREAM_URI}"'
        + (f' ovf:populatedSize="{d.populated_size}"' if d.populated_size is not None else "")
        + "/>\n"
        for i, d in enumerate(disks, 1)
    )
    items = [
        _item(
            {
                "AllocationUnits": "hertz * 10^6",
                "Description": "Number of Virtual CPUs",
                "ElementName": f"{hardware.cpus} virtual CPU(s)",
                "InstanceID": 1,
                "ResourceType": RT_CPU,
                "VirtualQuantity": hardware.cpus,
            }
        ),
        _item(
            {
                "AllocationUnits": "byte * 2^20",
                "Description": "Memory Size",
                "ElementName": f"{hardware.memory_mib}MB of memory",
                "InstanceID": 2,
                "ResourceType": RT_MEMORY,
                "VirtualQuantity": hardware.memory_mib,
            }
        ),
    ]
    slots = disk_slots(scsi, len(disks))
    items += [
        _item(
            {
                "Address": bus,
                "Description": "SCSI Controller" if scsi else "IDE Controller",
                "ElementName": f"scsiController{bus}" if scsi else f"ideController{bus}",
                "InstanceID": CONTROLLER_IDS[bus],
                "ResourceSubType": hardware.controller,
                "ResourceType": RT_SCSI if scsi else RT_IDE,
            }
        )
        for bus in sorted({bus for bus, _ in slots})
    ]
    items += [
        _item(
            {
                "AddressOnParent": unit,
                "ElementName": f"disk{index}",
                "HostResource": f"ovf:/disk/vmdisk{index + 1}",
                "InstanceID": 10 + index,
                "Parent": CONTROLLER_IDS[bus],
                "ResourceType": RT_DISK,
            }
        )
        for index, (bus, unit) in enumerate(slots)
    ]
    items.append(
        _item(
            {
                "AutomaticAllocation": "true",
                "Connection": "VM Network",
                "Description": "E1000 ethernet adapter",
                "ElementName": "ethernet0",
                "InstanceID": 4,
                "ResourceSubType": "E1000",
                "ResourceType": RT_NIC,
            }
        )
    )
    name = escape(hardware.name)
    text = f"""<?xml version="1.0" encoding="UTF-8"?>
<Envelope ovf:version="1.0" xml:lang="en-US" xmlns="{NS_OVF_1}" xmlns:ovf="{NS_OVF_1}" xmlns:rasd="{NS_RASD}" \
xmlns:vssd="{NS_VSSD}" xmlns:vmw="{NS_VMW}" xmlns:xsi="{NS_XSI}">
  <References>
{files}  </References>
  <DiskSection>
    <Info>Virtual disk information</Info>
{disk_lines}  </DiskSection>
  <NetworkSection>
    <Info>The list of logical networks</Info>
    <Network ovf:name="VM Network">
      <Description>The VM Network network</Description>
    </Network>
  </NetworkSection>
  <VirtualSystem ovf:id={quoteattr(hardware.name)}>
    <Info>A virtual machine</Info>
    <Name>{name}</Name>
    <OperatingSystemSection ovf:id="{hardware.os_cim_id}" vmw:osType={quoteattr(hardware.os_type)}>
      <Info>The kind of installed guest operating system</Info>
    </OperatingSystemSection>
    <VirtualHardwareSection>
      <Info>Virtual hardware requirements</Info>
      <System>
        <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>
        <vssd:InstanceID>0</vssd:InstanceID>
        <vssd:VirtualSystemIdentifier>{name}</vssd:VirtualSystemIdentifier>
        <vssd:VirtualSystemType>{escape(hardware.system_type)}</vssd:VirtualSystemType>
      </System>
{"".join(items)}    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
"""
    return text.encode()


def padded(descriptor: bytes, size: int) -> bytes:
    """The descriptor padded with trailing whitespace (legal after the root element) to ``size``."""
    if len(descriptor) > size:
        raise ValueError(f"OVF descriptor of {len(descriptor)} bytes exceeds its reserved {size}")
    return descriptor + b" " * (size - len(descriptor) - 1) + b"\n" if len(descriptor) < size else descriptor

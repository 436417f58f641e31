"""The formats vmied reads and writes, in probe order (most specific magic first).

Each format module adds itself here; raw comes last and is never chosen by a probe.
"""

from __future__ import annotations

from .base import Reader, Writer
from .ova import OvaReader, OvaWriter
from .qcow2 import Qcow2Reader, Qcow2Writer
from .raw import RawReader, RawWriter
from .vhd import VhdReader, VhdWriter
from .vhdx import VhdxReader, VhdxWriter
from .vmdk import VmdkReader, VmdkWriter

READERS: list[type[Reader]] = [Qcow2Reader, VmdkReader, VhdxReader, VhdReader, OvaReader, RawReader]
WRITERS: dict[str, type[Writer]] = {"raw": RawWriter, "ova": OvaWriter, "qcow2": Qcow2Writer, "vmdk": VmdkWriter,
                                    "vhd": VhdWriter, "vhdx": VhdxWriter}

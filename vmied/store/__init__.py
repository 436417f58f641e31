"""The snapshot store (design §4): snapshots as packs of deflated 64 KiB grains plus a manifest.

``open_store(config, workers)`` gives a :class:`SnapshotStore` on a local directory or an S3 bucket
+ prefix from the daemon's configuration; the same store is built from explicit parts with
``SnapshotStore(LocalObjects(path) | await S3Objects.open(S3Config, bucket, prefix), workers)``.
The object formats are in :mod:`.layout`, the object layer in :mod:`.objects`.
"""

from __future__ import annotations

import os
from typing import Any

from ..errors import UsageError
from ..io.s3_config import S3Config
from ..pipeline import Workers
from .layout import GRAIN_SIZE, CorruptSnapshot, SnapshotNotFound
from .objects import LocalObjects, Objects, S3Objects
from .store import SnapshotStore, StoredSnapshot, StoreOptions, StoreReader


def store_options(store_config: Any) -> StoreOptions:
    """Options from a ``[store]`` section; attributes it lacks keep their defaults."""
    defaults = StoreOptions()
    names = ("pack_size", "packs_in_flight", "window", "readahead", "index_cache_bytes", "digest_max_size")
    return StoreOptions(**{name: getattr(store_config, name, getattr(defaults, name)) for name in names})


def store_s3_config(config: Any) -> S3Config:
    """S3 access to the store's bucket: ``Config.store_s3_config()``, or built from ``config.store``."""
    if hasattr(config, "store_s3_config"):
        s3: S3Config = config.store_s3_config()
        return s3
    section = config.store
    endpoint = section.endpoint_url or None
    return S3Config(profile=section.profile or None, region=section.region or None, endpoint_url=endpoint,
                    path_style=getattr(section, "path_style", bool(endpoint)),
                    ca_bundle=getattr(section, "ca_bundle", "") or None)


async def open_store(config: Any, workers: Workers) -> SnapshotStore:
    """The store ``config.store`` describes (``kind`` local: ``path``; s3: ``bucket``, ``prefix``, ...)."""
    section = config.store
    kind = getattr(section, "kind", "local")
    objects: Objects
    if kind == "local":
        path = section.path or os.path.join(config.state.directory, "store")
        objects = await LocalObjects.open(path)
    elif kind == "s3":
        if not section.bucket:
            raise UsageError("store.kind is s3 but store.bucket is empty")
        objects = await S3Objects.open(store_s3_config(config), section.bucket, section.prefix)
    else:
        raise UsageError(f"store.kind {kind!r}: choose local or s3")
    return SnapshotStore(objects, workers, store_options(section))


__all__ = ["GRAIN_SIZE", "CorruptSnapshot", "LocalObjects", "Objects", "S3Objects", "SnapshotNotFound",
           "SnapshotStore", "StoreOptions", "StoreReader", "StoredSnapshot", "open_store", "store_options"]

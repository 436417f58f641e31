"""The EC2 query API of ``vmied serve``: wire codec, SigV4, policies, the aiohttp app, the handlers.

Handler modules register their actions with ``@operation`` when imported; :func:`load_handlers`
imports all of them (``make_ec2_app`` calls it). It is a function rather than an import at package
import time so that a handler module may import the tasks service, which itself imports
``vmied.api.operations``, without an import cycle.
"""

from __future__ import annotations

import importlib
import importlib.util

#: Every handler module of the EC2 API, in the order they are imported.
HANDLER_MODULES: tuple[str, ...] = (
    "import_tasks", "images", "snapshots", "tags", "export_tasks", "conversion_tasks",
)
#: Handler modules other helpers have not written yet; a missing module NOT listed here is an error.
#: Keep in sync: remove a name as soon as its module lands.
NOT_YET_WRITTEN: frozenset[str] = frozenset()


def load_handlers() -> list[str]:
    """Import every handler module that exists (registering its operations); the names imported."""
    imported = []
    for name in HANDLER_MODULES:
        qualified = f"{__name__}.{name}"
        if importlib.util.find_spec(qualified) is None:
            if name in NOT_YET_WRITTEN:
                continue
            raise ImportError(f"the EC2 handler module {qualified} is missing")
        importlib.import_module(qualified)  # a real error inside the module propagates
        imported.append(name)
    return imported

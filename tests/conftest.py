from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def corpus_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where compressed corpus files are unpacked, once per test session."""
    return tmp_path_factory.mktemp("corpus")


@pytest.fixture(scope="session", autouse=True)
def _qemu_img_present() -> None:
    if shutil.which("qemu-img") is None:
        pytest.exit("qemu-img is required (Debian package qemu-utils): run the README's test command", 2)

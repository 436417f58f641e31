"""``vmied convert`` and ``vmied info`` as a script sees them: exit codes, messages, JSON, cleanup."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

from .helpers import MiB, leftovers, qemu_img, random_layout, write_sparse_raw


def vmied(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vmied", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def _vmdk(tmp_path: Path) -> tuple[Path, Path]:
    src = tmp_path / "src.raw"
    write_sparse_raw(src, 3 * MiB, random_layout(random.Random(7), 3 * MiB, 6))
    image = tmp_path / "src.vmdk"
    qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", src, image)
    return src, image


def test_convert_with_json_progress(tmp_path: Path) -> None:
    src, image = _vmdk(tmp_path)
    run = vmied("convert", image, tmp_path / "out.raw", "--progress=json")
    assert run.returncode == 0, run.stderr
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    assert lines[-1]["event"] == "done" and lines[-1]["percent"] == 100.0
    assert lines[-1]["source"]["format"] == "vmdk"
    assert lines[-1]["source"]["subformat"] == "streamOptimized"
    assert (tmp_path / "out.raw").read_bytes() == src.read_bytes()


def test_convert_to_vmdk_with_options(tmp_path: Path) -> None:
    src, _ = _vmdk(tmp_path)
    run = vmied("convert", "-f", "raw", src, tmp_path / "o.vmdk", "-O", "vmdk", "-o",
                "subformat=monolithicSparse,adapter_type=ide")
    assert run.returncode == 0, run.stderr
    assert "monolithicSparse" in qemu_img("info", tmp_path / "o.vmdk")


#: What a local conversion must not load: the S3 and HTTP clients, the metrics registry, the daemon's
#: status client, and the codecs of formats not in play. Each is tens of milliseconds of start-up,
#: which is a large part of an I/O-bound conversion (qemu-img starts in 5 ms).
REMOTE_ONLY_MODULES = ("botocore", "aiobotocore", "aiohttp", "prometheus_client", "urllib.request",
                       "pyzstd", "crc32c", "vmied.io.s3", "vmied.metrics")


def test_local_conversion_loads_no_remote_client(tmp_path: Path) -> None:
    _, image = _vmdk(tmp_path)
    probe = ("import sys; from vmied.cli import main; code = main(sys.argv[1:]); "
             f"print(sorted(set({REMOTE_ONLY_MODULES!r}) & set(sys.modules))); sys.exit(code)")
    run = subprocess.run([sys.executable, "-c", probe, "convert", str(image), str(tmp_path / "out.vhd"),
                          "-O", "vhd", "--progress=none"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


def test_info_json(tmp_path: Path) -> None:
    _, image = _vmdk(tmp_path)
    run = vmied("info", image, "--output", "json")
    assert run.returncode == 0, run.stderr
    info = json.loads(run.stdout)
    assert info["format"] == "vmdk" and info["virtual_size"] == 3 * MiB and info["cluster_size"] == 65536
    human = vmied("info", image)
    assert "file format: vmdk (streamOptimized)" in human.stdout


def test_refused_image_exit_code_and_no_leftovers(tmp_path: Path) -> None:
    bad = tmp_path / "bad.img"
    bad.write_bytes(b"WithoutFreeSpace" + bytes(4096))
    run = vmied("convert", bad, tmp_path / "out.raw")
    assert run.returncode == 3
    assert "unsupported input format: parallels" in run.stderr
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "out.raw").exists() and not list(leftovers(tmp_path))


def test_unknown_content_is_not_taken_for_raw(tmp_path: Path) -> None:
    bad = tmp_path / "mystery.bin"
    bad.write_bytes(random.Random(1).randbytes(8192))
    run = vmied("info", bad)
    assert run.returncode == 3 and "-f raw" in run.stderr
    assert vmied("info", "-f", "raw", bad).returncode == 0


def test_usage_and_storage_errors(tmp_path: Path) -> None:
    _, image = _vmdk(tmp_path)
    assert vmied("convert", image, tmp_path / "o", "-O", "nosuch").returncode == 2
    run = vmied("convert", image, tmp_path / "o", "-O", "vmdk", "-o", "subformat=bogus")
    assert run.returncode == 2 and "subformat" in run.stderr
    run = vmied("convert", tmp_path / "missing.vmdk", tmp_path / "o")
    assert run.returncode == 4 and "missing.vmdk" in run.stderr
    run = vmied("convert", image, tmp_path / "no-such-dir" / "o")
    assert run.returncode == 4 and not list(leftovers(tmp_path))


def test_corruption_found_mid_stream_leaves_nothing(tmp_path: Path) -> None:
    _, image = _vmdk(tmp_path)
    data = bytearray(image.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = b"\xff" * 64  # inside a grain's deflate data
    image.write_bytes(bytes(data))
    out = tmp_path / "out.raw"
    run = vmied("convert", image, out)
    assert run.returncode == 3, run.stderr
    assert not out.exists() and not list(leftovers(tmp_path))

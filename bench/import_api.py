"""ImportImage through the daemon against ``vmied convert`` S3 to S3 of the same data (issue 6, item 8).

    python3 bench/import_api.py (--vmdk PATH | --disk PATH) [--work DIR] [--repeat N]

A SeaweedFS server on 127.0.0.1 holds a stream-optimized VMDK (``--vmdk``, or made from the raw
``--disk`` with qemu-img, untimed). Timed, each the best of ``--repeat`` runs:

  convert:  vmied convert s3://in.vmdk s3://out.vmdk -O vmdk -o subformat=streamOptimized
            (the same grains in and out, as the snapshot store keeps them)
  import:   ImportImage of s3://in.vmdk (boto3) until DescribeImportImageTasks says completed, with
            the daemon's snapshot store in the same SeaweedFS (S3 to S3) and on a local directory.

The difference is what the service costs on top of the conversion: the API call, the task's
phases and catalog commits, the polling interval (0.1 s), and the store's packing.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from run import measure, prepare  # noqa: E402
from s3 import import_image, seaweed_with_profiles  # noqa: E402

from tests.daemon import DaemonProcess  # noqa: E402
from tests.s3server import BUCKET, S3Server  # noqa: E402

KEY = "bench/in.vmdk"


def convert_command(s3: S3Server) -> list[str]:
    return [sys.executable, "-m", "vmied", "convert", f"s3://{BUCKET}/{KEY}", f"s3://{BUCKET}/bench/out.vmdk",
            "-O", "vmdk", "-o", "subformat=streamOptimized", "--endpoint-url", s3.endpoint, "--profile", "weed"]


def store_in_s3(s3: S3Server) -> str:
    return (f'\n[store]\nkind = "s3"\nbucket = "{BUCKET}"\nprefix = "store/"\nendpoint_url = "{s3.endpoint}"\n'
            'profile = "weed"\nregion = "us-east-1"\npath_style = true\n')


def time_import(daemon: DaemonProcess) -> float:
    ec2 = daemon.client()
    image_id, elapsed = import_image(ec2, KEY)
    ec2.deregister_image(ImageId=image_id, DeleteAssociatedSnapshots=True)
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--vmdk", type=Path, help="a stream-optimized VMDK of the realistic disk")
    source.add_argument("--disk", type=Path, help="the realistic raw disk (made into a VMDK stream first)")
    parser.add_argument("--work", type=Path, default=HERE / "out", help="where scratch files go")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    vmdk = args.vmdk or prepare(args.disk, "stream.vmdk", args.work)
    with seaweed_with_profiles(args.work) as (root, s3, env):
        run(args, vmdk, root, s3, env)
    return 0


def run(args: argparse.Namespace, vmdk: Path, root: Path, s3: S3Server, env: dict[str, str]) -> None:
    s3.client().upload_file(str(vmdk), BUCKET, KEY)
    print(f"input: {vmdk} ({vmdk.stat().st_size / 2**20:.0f} MiB stream-optimized VMDK), "
          f"{os.cpu_count()} cores, SeaweedFS at {s3.endpoint}")
    convert = min(measure(convert_command(s3), None, env).wall for _ in range(args.repeat))
    rows = [("vmied convert S3 to S3 (VMDK stream)", convert)]
    for name, extra in (("ImportImage, store in S3", store_in_s3(s3)), ("ImportImage, local store", "")):
        directory = root / name.split()[-1]
        directory.mkdir()
        daemon = DaemonProcess(directory, s3, extra=extra, read_buckets=[BUCKET])
        daemon.start()
        try:
            rows.append((f"{name} (API call to completed)", min(time_import(daemon) for _ in range(args.repeat))))
        finally:
            daemon.stop(timeout=120)
    print("| case | best wall s | vs convert |")
    print("|---|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.2f} | {seconds / convert:.2f}x |")


if __name__ == "__main__":
    sys.exit(main())

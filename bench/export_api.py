"""ExportImage through the daemon against qemu-img converting the same data from a local file (issue 7, item 7).

    python3 bench/export_api.py (--vmdk PATH | --disk PATH) [--disk PATH] [--work DIR] [--repeat N]

Untimed: a SeaweedFS server on 127.0.0.1 gets the stream-optimized VMDK of the realistic disk
(``--vmdk``, or made from ``--disk`` with qemu-img), the daemon (local snapshot store) imports it
with ImportImage, and the raw disk is read once so qemu-img starts with it in the page cache.
Timed, each the best of ``--repeat`` runs, for VMDK (stream-optimized), VHD (dynamic) and RAW:

  qemu-img:     qemu-img convert -f raw -O <fmt> <local raw disk> <local file>
  + upload:     that, then ``aws s3 cp`` of the file to the SeaweedFS bucket (what the user of
                qemu-img still has to do to get the export where ExportImage puts it)
  ExportImage:  boto3 ExportImage to the SeaweedFS bucket until DescribeExportImageTasks says
                completed (the snapshot store read, the writer, the S3 multipart upload, polling 0.1 s)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from run import measure, prepare, warm  # noqa: E402
from s3 import import_image, seaweed_with_profiles  # noqa: E402

from tests.daemon import DaemonProcess  # noqa: E402
from tests.s3server import BUCKET, S3Server  # noqa: E402

KEY = "bench/in.vmdk"
#: DiskImageFormat -> qemu-img's output format and options for the same kind of file.
FORMATS = {
    "VMDK": ["-O", "vmdk", "-o", "subformat=streamOptimized"],
    "VHD": ["-O", "vpc", "-o", "subformat=dynamic"],
    "RAW": ["-O", "raw"],
}


def time_export(daemon: DaemonProcess, s3: S3Server, image_id: str, fmt: str) -> tuple[float, int]:
    ec2 = daemon.client()
    start = time.perf_counter()
    task_id = ec2.export_image(ImageId=image_id, DiskImageFormat=fmt,
                               S3ExportLocation={"S3Bucket": BUCKET, "S3Prefix": "bench/exports/"}
                               )["ExportImageTaskId"]
    while True:
        task = ec2.describe_export_image_tasks(ExportImageTaskIds=[task_id])["ExportImageTasks"][0]
        if task["Status"] in ("completed", "deleted"):
            break
        time.sleep(0.1)
    elapsed = time.perf_counter() - start
    if task["Status"] != "completed":
        raise SystemExit(f"export failed: {task.get('StatusMessage')}")
    key = f"bench/exports/{task_id}.{fmt.lower()}"
    client = s3.client()
    size = int(client.head_object(Bucket=BUCKET, Key=key)["ContentLength"])
    client.delete_object(Bucket=BUCKET, Key=key)
    return elapsed, size


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--disk", type=Path, required=True, help="the realistic raw disk (make-test-disk.sh)")
    parser.add_argument("--vmdk", type=Path, help="its stream-optimized VMDK (made from --disk if not given)")
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
    print(f"disk: {args.disk} ({args.disk.stat().st_size / 2**30:.1f} GiB raw; {vmdk.stat().st_size / 2**20:.0f} "
          f"MiB VMDK stream imported), {os.cpu_count()} cores, SeaweedFS at {s3.endpoint}")
    (root / "daemon").mkdir()
    daemon = DaemonProcess(root / "daemon", s3, read_buckets=[BUCKET])
    daemon.start()
    try:
        image_id, imported = import_image(daemon.client(), KEY)
        print(f"ImportImage (untimed setup): {imported:.2f} s")
        warm(args.disk)
        print("| format | qemu-img local file s | qemu-img + aws s3 cp s | output MiB | ExportImage to S3 s "
              "| output MiB | vs qemu-img | vs qemu-img + upload |")
        print("|---|---|---|---|---|---|---|---|")
        for fmt, options in FORMATS.items():
            out = root / f"qemu.{fmt.lower()}"
            qemu = min((measure(["qemu-img", "convert", "-f", "raw", *options, str(args.disk), str(out)], out)
                        for _ in range(args.repeat)), key=lambda run: run.wall)
            upload = measure(["aws", "s3", "cp", "--only-show-errors", str(out), f"s3://{BUCKET}/bench/qemu-out",
                              "--endpoint-url", s3.endpoint], None, env).wall
            s3.client().delete_object(Bucket=BUCKET, Key="bench/qemu-out")
            out.unlink()
            exports = [time_export(daemon, s3, image_id, fmt) for _ in range(args.repeat)]
            seconds, size = min(exports)
            both = qemu.wall + upload
            print(f"| {fmt} | {qemu.wall:.2f} | {both:.2f} | {qemu.output_bytes / 2**20:.0f} | {seconds:.2f} | "
                  f"{size / 2**20:.0f} | {seconds / qemu.wall:.2f}x | {seconds / both:.2f}x |", flush=True)
    finally:
        daemon.stop(timeout=120)


if __name__ == "__main__":
    sys.exit(main())

"""``vmied``: convert and inspect disk images (qemu-img's shape), and run the service.

Exit codes a script can rely on: 0 success, 1 unexpected failure, 2 usage error, 3 image refused
(corrupt, hostile or unsupported: the message names why), 4 storage error (cannot read the source
or write the destination), 130 cancelled (nothing partial is left behind).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TextIO

import uvloop

from . import __version__, malloc
from .convert import convert
from .errors import Cancelled, UsageError, VmiedError
from .formats import open_reader, output_formats
from .io.base import DEFAULT_READAHEAD, MiB
from .io.open import create_sink, open_source
from .io.s3_config import (
    DEFAULT_PART_SIZE,
    DEFAULT_PARTS_IN_FLIGHT,
    DEFAULT_REMOTE_WINDOW,
    DEFAULT_ZERO_COPY_MAX,
    S3Config,
)
from .pipeline import Progress, Workers

EXIT_UNEXPECTED = 1


def parse_options(text: list[str] | None) -> dict[str, str]:
    """``-o key=value[,key=value]`` (repeatable), as qemu-img takes them."""
    options: dict[str, str] = {}
    for group in text or []:
        for item in filter(None, group.split(",")):
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise UsageError(f"option {item!r} is not key=value")
            options[key.strip()] = value.strip()
    return options


class ProgressReporter:
    """A progress bar on a terminal, JSON lines for scripts, or nothing."""

    def __init__(self, mode: str, stream: TextIO) -> None:
        self.mode = mode
        self.stream = stream
        self._last = 0.0

    def __call__(self, progress: Progress) -> None:
        now = time.monotonic()
        if self.mode == "none" or (now - self._last < 0.5 and progress.position < progress.virtual_size):
            return
        self._last = now
        if self.mode == "json":
            self.emit({"event": "progress", **self.figures(progress)})
            return
        width = 40
        filled = int(width * progress.fraction)
        rate = progress.position / max(progress.elapsed, 1e-6) / 1e6
        self.stream.write(
            f"\r[{'#' * filled}{'.' * (width - filled)}] {100 * progress.fraction:5.1f}% {rate:8.1f} MB/s"
        )
        self.stream.flush()

    @staticmethod
    def figures(progress: Progress) -> dict[str, Any]:
        return {
            "position": progress.position,
            "virtual_size": progress.virtual_size,
            "percent": round(100 * progress.fraction, 2),
            "elapsed_seconds": round(progress.elapsed, 3),
        }

    def emit(self, record: dict[str, Any]) -> None:
        self.stream.write(json.dumps(record) + "\n")
        self.stream.flush()

    def finish(self) -> None:
        if self.mode == "bar":
            self.stream.write("\n")


async def run_convert(args: argparse.Namespace) -> int:
    mode = args.progress or ("bar" if sys.stderr.isatty() else "none")
    reporter = ProgressReporter(mode, sys.stdout if mode == "json" else sys.stderr)
    progress = Progress(listeners=[reporter])
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, progress.cancel)
    options = parse_options(args.options)
    source = await open_source(args.source, s3_config(args, args.source_profile))
    try:
        sink = await create_sink(args.destination, s3_config(args, args.dest_profile),
                                 expected_size=source.size, sync=args.sync)  # size: a hint for S3 parts
        with Workers() as workers:
            result = await convert(
                source, sink, args.output_format, options=options, input_format=args.format,
                workers=workers, progress=progress,
            )
    finally:
        await source.close()
    reporter.finish()
    if mode == "json":
        reporter.emit({"event": "done", **reporter.figures(progress), "output_bytes": result.output_bytes,
                       "source": result.source.as_dict()})
    return 0


async def run_info(args: argparse.Namespace) -> int:
    source = await open_source(args.image, s3_config(args, args.source_profile))
    try:
        with Workers() as workers:
            reader = await open_reader(source, workers, args.format)
            info = reader.info()
    finally:
        await source.close()
    if args.output == "json":
        print(json.dumps({"filename": args.image, **info.as_dict()}, indent=2))
        return 0
    print(f"image: {args.image}")
    print(f"file format: {info.format}" + (f" ({info.subformat})" if info.subformat else ""))
    print(f"virtual size: {info.virtual_size} bytes")
    if info.allocated_bytes is not None:
        print(f"allocated: {info.allocated_bytes} bytes")
    if info.cluster_size:
        print(f"cluster size: {info.cluster_size}")
    for key, value in info.details.items():
        print(f"{key.replace('_', ' ')}: {value}")
    for problem in info.problems:
        print(f"problem: {problem}")
    return 0


def s3_config(args: argparse.Namespace, profile: str | None) -> S3Config:
    """The identity and endpoint for one side of the conversion (``--source-profile`` etc. win)."""
    return S3Config(profile=profile or args.profile, region=args.region, endpoint_url=args.endpoint_url,
                    path_style=args.path_style, ca_bundle=args.ca_bundle,
                    window=args.window_size * MiB, readahead=args.readahead,
                    part_size=args.part_size * MiB, parts_in_flight=args.parts_in_flight,
                    zero_copy_max=args.zero_copy_max * MiB)


def add_storage_arguments(parser: argparse.ArgumentParser, destination: bool) -> None:
    """Where s3:// locations are and who reads (and writes) them; defaults: the AWS chain."""
    group = parser.add_argument_group("S3 and https locations")
    group.add_argument("--endpoint-url", help="S3-compatible endpoint instead of AWS")
    group.add_argument("--profile", help="AWS profile (shared config files) for every s3:// location")
    group.add_argument("--source-profile", help="AWS profile for the source (overrides --profile)")
    group.add_argument("--region", help="AWS region")
    group.add_argument("--path-style", action="store_true", help="address buckets in the path, not the host")
    group.add_argument("--ca-bundle", help="PEM file of trusted CAs (default: AWS_CA_BUNDLE, system)")
    group.add_argument("--window-size", type=int, default=DEFAULT_REMOTE_WINDOW // MiB, metavar="MIB",
                       help="size of one ranged read of a sequential pass, in MiB")
    group.add_argument("--readahead", type=int, default=DEFAULT_READAHEAD, metavar="N",
                       help="ranged reads in flight ahead of the reader")
    group.add_argument("--part-size", type=int, default=DEFAULT_PART_SIZE // MiB, metavar="MIB",
                       help="base multipart part size in MiB (grown only for very large outputs)")
    group.add_argument("--parts-in-flight", type=int, default=DEFAULT_PARTS_IN_FLIGHT, metavar="N",
                       help="parts uploaded at once (memory: part size x (N + 1))")
    group.add_argument("--zero-copy-max", type=int, default=DEFAULT_ZERO_COPY_MAX // MiB, metavar="MIB",
                       help="largest scratch object of zeros in the destination bucket that runs of "
                            "zeros are copied from inside the server (0: upload every zero)")
    if destination:
        group.add_argument("--dest-profile", help="AWS profile for the destination (overrides --profile)")


async def run_serve(args: argparse.Namespace) -> int:
    from .daemon import serve, show_config

    if args.show_config:
        return show_config(args.config)
    return await serve(args.config)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vmied", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"vmied {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    conv = commands.add_parser("convert", help="convert a disk image to another format")
    conv.add_argument("source", metavar="SRC")
    conv.add_argument("destination", metavar="DST")
    conv.add_argument("-f", dest="format", help="input format (detected from content when omitted; "
                      "'raw' must be given for raw disks)")
    conv.add_argument("-O", dest="output_format", default="raw", help=f"output format: {', '.join(output_formats())}")
    conv.add_argument("-o", dest="options", action="append", metavar="KEY=VALUE[,...]",
                      help="output options, e.g. subformat=streamOptimized")
    conv.add_argument("--progress", choices=("bar", "json", "none"),
                      help="progress display (default: bar on a terminal, none otherwise)")
    add_storage_arguments(conv, destination=True)
    conv.add_argument("--no-sync", dest="sync", action="store_false",
                      help="local output: skip the fsync before the output appears (as qemu-img); "
                      "faster, but a crash may leave a damaged file")
    conv.set_defaults(run=run_convert)

    info = commands.add_parser("info", help="describe a disk image")
    info.add_argument("image", metavar="IMAGE")
    info.add_argument("-f", dest="format", help="declared input format")
    info.add_argument("--output", choices=("human", "json"), default="human")
    add_storage_arguments(info, destination=False)
    info.set_defaults(run=run_info)

    serve = commands.add_parser("serve", help="run the EC2-compatible VM Import/Export service")
    serve.add_argument("--config", metavar="PATH",
                       help="configuration file (default: /etc/vmied/vmied.toml and /etc/vmied/conf.d/*.toml)")
    serve.add_argument("--show-config", action="store_true",
                       help="print the effective configuration (secrets masked) and exit")
    serve.set_defaults(run=run_serve)

    from .taskctl import add_tasks_parser

    add_tasks_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace], Coroutine[Any, Any, int]] = args.run
    malloc.tune()
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(run(args))
    except VmiedError as exc:
        if isinstance(exc, Cancelled):
            print("vmied: cancelled; no output was left behind", file=sys.stderr)
        else:
            print(f"vmied: error: {exc.message} [{exc.reason}]", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return Cancelled.exit_code


if __name__ == "__main__":
    sys.exit(main())

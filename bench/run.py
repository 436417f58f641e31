"""vmied against qemu-img, same machine, same run: wall time, CPU time, peak RSS, output size.

    python3 bench/run.py [--disk PATH] [--work DIR] [--cases NAME,...] [--repeat N]

The disk is the realistic one ../shared/tools/make-test-disk.sh builds (8 GiB, ext4, ~1.5 GB of
Debian files); it is built (and cached) when --disk is not given. Inputs in other formats are made
from it with qemu-img first (untimed). Every timed command writes a local file without an fsync
(qemu-img does not sync; vmied is run with --no-sync), with the page cache warm and the previous
run's dirty pages written back first (``sync``, untimed), so no run pays for another's writeback.
Each tool runs ``--repeat`` times, the two taking turns, and the fastest run counts; a run over
SLOW_RUN seconds is not repeated (the zlib encodes of qemu-img take a minute and vary little).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MAKE_DISK = ROOT.parent / "shared" / "tools" / "make-test-disk.sh"
VMIED = [sys.executable, "-m", "vmied", "convert", "--no-sync"]
SLOW_RUN = 20.0


@dataclass(frozen=True)
class Case:
    name: str
    source: str  # input kind: "raw" or a key of PREPARE
    vmied: list[str]  # vmied convert arguments after SRC DST
    qemu: list[str]  # qemu-img convert arguments after the input/output
    output_ext: str
    #: the baseline as a shell pipeline ({src}, {out}, {tmp}) where qemu-img alone is not the equivalent
    baseline: str = ""


QEMU_PREPARE = [sys.executable, "-c", "import subprocess, sys; subprocess.run(['qemu-img', 'convert', "
                "'-f', 'raw', *sys.argv[3:], sys.argv[1], sys.argv[2]], check=True)"]
#: Commands that make each input from the raw disk (untimed): SRC and DST are appended, then options.
PREPARE = {
    "stream.vmdk": [*QEMU_PREPARE, "-O", "vmdk", "-o", "subformat=streamOptimized"],
    "dynamic.vhd": [*QEMU_PREPARE, "-O", "vpc", "-o", "subformat=dynamic"],
    "dynamic.vhdx": [*QEMU_PREPARE, "-O", "vhdx"],
    "plain.qcow2": [*QEMU_PREPARE, "-O", "qcow2"],
    "vmied.ova": [*VMIED, "-f", "raw", "-O", "ova"],
}

CASES = [
    Case("vmdk-stream-to-raw", "stream.vmdk", ["-O", "raw"], ["-O", "raw"], "raw"),
    Case("raw-to-vmdk-stream", "raw", ["-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized"],
         ["-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized"], "vmdk"),
    Case("vhd-dynamic-to-raw", "dynamic.vhd", ["-O", "raw"], ["-O", "raw"], "raw"),
    Case("raw-to-vhd-dynamic", "raw", ["-f", "raw", "-O", "vhd", "-o", "subformat=dynamic"],
         ["-f", "raw", "-O", "vpc", "-o", "subformat=dynamic"], "vhd"),
    Case("vhdx-to-raw", "dynamic.vhdx", ["-O", "raw"], ["-O", "raw"], "raw"),
    Case("raw-to-vhdx", "raw", ["-f", "raw", "-O", "vhdx"], ["-f", "raw", "-O", "vhdx"], "vhdx"),
    Case("vmdk-stream-to-vhdx", "stream.vmdk", ["-O", "vhdx"], ["-O", "vhdx"], "vhdx"),
    Case("qcow2-to-raw", "plain.qcow2", ["-O", "raw"], ["-O", "raw"], "raw"),
    Case("raw-to-qcow2", "raw", ["-f", "raw", "-O", "qcow2"], ["-f", "raw", "-O", "qcow2"], "qcow2"),
    Case("raw-to-qcow2-compressed", "raw", ["-f", "raw", "-O", "qcow2", "-o", "compress=on"],
         ["-f", "raw", "-O", "qcow2", "-c"], "qcow2"),
    # OVA: what users do today is tar around qemu-img (the baseline writes no OVF descriptor or
    # manifest, so it does a little less than vmied).
    Case("ova-to-raw", "vmied.ova", ["-O", "raw"], [], "raw",
         baseline="tar -xf {src} -C {tmp} && qemu-img convert -O raw {tmp}/*.vmdk {out}"),
    Case("raw-to-ova", "raw", ["-f", "raw", "-O", "ova"], [], "ova",
         baseline="qemu-img convert -f raw -O vmdk -o subformat=streamOptimized {src} {tmp}/disk1.vmdk "
                  "&& tar -cf {out} -C {tmp} disk1.vmdk"),
]


@dataclass
class Run:
    wall: float
    cpu: float
    peak_rss_mib: float
    output_bytes: int


def measure(command: list[str], output: Path | None, env: dict[str, str] | None = None) -> Run:
    """Run once; wall time, user+system CPU and peak RSS of that process alone (wait4).

    ``output`` is a local file the command writes (its size is reported), or None.
    """
    if output:
        output.unlink(missing_ok=True)
    os.sync()
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        assert process.stderr is not None
        raise SystemExit(f"failed: {shlex.join(command)}\n{process.stderr.read().decode()}")
    return Run(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, output.stat().st_size if output else 0)


def best_of_turns(commands: list[list[str]], output: Path, repeat: int) -> list[Run]:
    """Each command's fastest of ``repeat`` runs, the commands taking turns: this VM's speed drifts
    over minutes, and one tool's runs in a block would meet another machine than the other's."""
    runs: list[list[Run]] = [[] for _ in commands]

    def wanted(done: list[Run]) -> bool:
        return not done or (len(done) < repeat and done[0].wall < SLOW_RUN)

    while any(wanted(done) for done in runs):
        for command, done in zip(commands, runs, strict=True):
            if wanted(done):
                done.append(measure(command, output))
    return [min(done, key=lambda run: run.wall) for done in runs]


def warm(path: Path) -> None:
    """Read the input once so both tools start with it in the page cache."""
    subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)


def compile_bytecode() -> None:
    """Byte-compile vmied as ``pip install`` does, so a source tree (or PYTHONDONTWRITEBYTECODE=1)
    does not make every timed run recompile the package (about 0.2 s of start-up)."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "vmied")], check=True,
                   stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONDONTWRITEBYTECODE": ""})


def build_disk() -> Path:
    out = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vmied-bench" / "debian-8g.raw"
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["bash", str(MAKE_DISK), "--fs", "ext4", "--size", "8G", "--out", str(out)], check=True)
    return out


def prepare(disk: Path, kind: str, work: Path) -> Path:
    if kind == "raw":
        return disk
    path = work / f"input-{kind}"
    if not path.exists():
        command, options = PREPARE[kind][:_fixed_arguments(kind)], PREPARE[kind][_fixed_arguments(kind):]
        subprocess.run([*command, str(disk), str(path) + ".part", *options], check=True)
        os.rename(str(path) + ".part", path)
    return path


def _fixed_arguments(kind: str) -> int:
    """Where a PREPARE command's options start (SRC and DST go before them)."""
    return len(VMIED) if PREPARE[kind][: len(VMIED)] == VMIED else len(QEMU_PREPARE)


def baseline_command(case: Case, source: Path, out: Path, tmp: Path) -> list[str]:
    if case.baseline:
        return ["bash", "-c", case.baseline.format(src=shlex.quote(str(source)), out=shlex.quote(str(out)),
                                                   tmp=shlex.quote(str(tmp)))]
    return ["qemu-img", "convert", *case.qemu, str(source), str(out)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--disk", type=Path, help="raw disk to use (default: build the realistic one)")
    parser.add_argument("--work", type=Path, default=HERE / "out", help="where inputs and outputs go")
    parser.add_argument("--cases", help="comma-separated case names (default: all)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per tool; the fastest counts")
    args = parser.parse_args()
    disk = args.disk or build_disk()
    args.work.mkdir(parents=True, exist_ok=True)
    compile_bytecode()
    wanted = set(args.cases.split(",")) if args.cases else None
    print(f"disk: {disk} ({disk.stat().st_size / 2**30:.1f} GiB, {os.cpu_count()} cores)")
    print("| case | qemu-img s | vmied s | speed-up | qemu-img CPU s | vmied CPU s | qemu-img out MB "
          "| vmied out MB | size ratio | vmied peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for case in CASES:
        if wanted and case.name not in wanted:
            continue
        source = prepare(disk, case.source, args.work)
        warm(source)
        out = args.work / f"out.{case.output_ext}"
        with tempfile.TemporaryDirectory(dir=args.work) as tmp:
            qemu, ours = best_of_turns([baseline_command(case, source, out, Path(tmp)),
                                        [*VMIED, str(source), str(out), *case.vmied]], out, args.repeat)
        out.unlink()
        print(f"| {case.name} | {qemu.wall:.2f} | {ours.wall:.2f} | {qemu.wall / ours.wall:.1f}x "
              f"| {qemu.cpu:.1f} | {ours.cpu:.1f} | {qemu.output_bytes / 1e6:.0f} | {ours.output_bytes / 1e6:.0f} "
              f"| {ours.output_bytes / qemu.output_bytes:.3f} | {ours.peak_rss_mib:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

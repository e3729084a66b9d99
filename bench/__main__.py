"""``python -m bench [BENCHMARK ...]``: run the benchmarks, print each table, write RESULTS.md.

With no benchmark named, all of them run and ``bench/RESULTS.md`` is rewritten; a
subset prints its tables and writes a file only when ``--out`` says where.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

from . import aggregation, gpu, large_model, overhead, relay, snapshot
from .common import MIB, Section, load_average, local_s3, machine

BENCHMARKS = ("overhead", "large", "aggregation", "snapshot", "gpu", "relay")
DEFAULT_OUT = Path(__file__).resolve().parent / "RESULTS.md"
# Sizes for a smoke test: every benchmark in seconds, proving it runs and makes its tables.
QUICK = {
    "sites": [2], "rounds": 2, "stores": ["file", "s3"], "model_mib": [8, 4], "large_sites": [2, 3], "large_rounds": 1,
    "updates": 2, "update_mib": 4, "snapshot_mib": 8, "repeats": 1, "cpu_samples": 512, "cpu_epochs": 2,
    "relay_sites": [2], "relay_rounds": 2, "relay_wire_mib": 8, "relay_memory_mib": 16, "relay_many": 4,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("benchmarks", nargs="*", metavar="BENCHMARK", help=f"any of {', '.join(BENCHMARKS)} (default: all)")
    parser.add_argument("--out", type=Path, help=f"write the results here (default with all benchmarks: {DEFAULT_OUT})")
    parser.add_argument("--work-dir", type=Path, help="where the temporary files go (default: the system's)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test, not a measurement")
    parser.add_argument("--gpu", action="store_true", help="measure training on the GPU (needs CUDA)")
    group = parser.add_argument_group("round overhead")
    group.add_argument("--sites", type=int, nargs="+", default=[2, 8], help="federation sizes (default: 2 8)")
    group.add_argument("--rounds", type=int, default=20)
    group.add_argument("--stores", nargs="+", choices=("file", "s3"), default=["file", "s3"])
    group = parser.add_argument_group("large model round")
    group.add_argument("--model-mib", type=int, nargs="+", default=[256, 1024], help="model sizes (default: 256 1024)")
    group.add_argument("--large-sites", type=int, nargs="+", default=[2, 4],
                       help="sites for each model size, in the same order (default: 2 4)")
    group.add_argument("--large-rounds", type=int, default=3)
    group = parser.add_argument_group("aggregation and snapshot")
    group.add_argument("--updates", type=int, default=8)
    group.add_argument("--update-mib", type=int, default=256)
    group.add_argument("--snapshot-mib", type=int, default=1024)
    group.add_argument("--repeats", type=int, default=3, help="runs per figure (default: 3)")
    group = parser.add_argument_group("training throughput")
    group.add_argument("--cpu-samples", type=int, help="samples of the CPU workload")
    group.add_argument("--cpu-epochs", type=int, help="epochs of the CPU workload")
    group = parser.add_argument_group("through a relay")
    group.add_argument("--relay-sites", type=int, nargs="+", default=[2, 8], help="federation sizes (default: 2 8)")
    group.add_argument("--relay-rounds", type=int, default=10)
    group.add_argument("--relay-wire-mib", type=int, default=256, help="model size of the wire figures")
    group.add_argument("--relay-memory-mib", type=int, default=1024,
                       help="model carried up and down once before the relay's memory is read (default: 1024)")
    group.add_argument("--relay-many", type=int, default=32, help="sites attached to one relay (default: 32)")
    args = parser.parse_args(argv)
    unknown = [name for name in args.benchmarks if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
    if len(args.model_mib) != len(args.large_sites):
        parser.error("--model-mib and --large-sites need as many values each (one row per pair)")
    args.benchmarks = list(dict.fromkeys(args.benchmarks)) or list(BENCHMARKS)
    if args.out is None and set(args.benchmarks) == set(BENCHMARKS) and not args.quick:
        args.out = DEFAULT_OUT
    return args


def command(name: str, args: argparse.Namespace) -> str:
    """The command line that reproduces one benchmark's figures."""
    options = {
        "overhead": f"--sites {' '.join(map(str, args.sites))} --rounds {args.rounds} --stores {' '.join(args.stores)}",
        "large": f"--model-mib {' '.join(map(str, args.model_mib))} --large-sites {' '.join(map(str, args.large_sites))} "
                 f"--large-rounds {args.large_rounds}",
        "aggregation": f"--updates {args.updates} --update-mib {args.update_mib} --repeats {args.repeats}",
        "snapshot": f"--snapshot-mib {args.snapshot_mib} --repeats {args.repeats}",
        "gpu": ("--gpu " if args.gpu else "") + f"--repeats {args.repeats}" + (
            f" --cpu-samples {args.cpu_samples}" if args.cpu_samples else "") + (
            f" --cpu-epochs {args.cpu_epochs}" if args.cpu_epochs else ""),
        "relay": f"--relay-sites {' '.join(map(str, args.relay_sites))} --relay-rounds {args.relay_rounds} "
                 f"--relay-wire-mib {args.relay_wire_mib} --relay-memory-mib {args.relay_memory_mib} "
                 f"--relay-many {args.relay_many}",
    }
    return f"python -m bench {name} {options[name]}" + (" --quick" if args.quick else "")


def run_one(name: str, args: argparse.Namespace, work: Path, s3) -> Section:
    cmd = command(name, args)
    if name == "overhead":
        return overhead.run(work, s3, args.sites, args.rounds, args.stores, cmd, startup_runs=2 if args.quick else 7)
    if name == "large":
        configs = [(mib * MIB, sites) for mib, sites in zip(args.model_mib, args.large_sites)]
        return large_model.run(work, configs, args.large_rounds, cmd)
    if name == "aggregation":
        return aggregation.run(work, args.updates, args.update_mib * MIB, args.repeats, cmd)
    if name == "snapshot":
        return snapshot.run(work, s3, args.snapshot_mib * MIB, args.repeats, cmd)
    if name == "relay":
        return relay.run(work, args.relay_sites, args.relay_rounds, args.relay_wire_mib * MIB, args.relay_memory_mib * MIB,
                         args.relay_many, cmd)
    cpu = gpu.CPU_WORKLOAD
    if args.cpu_samples:
        cpu = replace(cpu, samples=args.cpu_samples)
    if args.cpu_epochs:
        cpu = replace(cpu, epochs=args.cpu_epochs)
    return gpu.run(work, args.gpu, args.repeats, cpu, gpu.GPU_WORKLOAD, cmd)


def results_markdown(sections: list[Section], facts: dict[str, str], started: str, seconds: float) -> str:
    lines = [
        "# Benchmarks",
        "",
        f"Written by `make bench` (`python -m bench`) on {started}, in {seconds / 60:.1f} minutes. Every figure is "
        "the median of several runs (each section says how many) and is set against a limit or target measured "
        "on the same machine in the same run. Other work may share this machine: each section gives the load "
        "average before and after it ran.",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        *[f"| {key} | {value} |" for key, value in facts.items()],
        "",
        "## Summary",
        "",
        "| figure | measured | limit or target | ratio |",
        "|---|---|---|---|",
        *[f"| {' | '.join(row)} |" for section in sections for row in section.summary],
        "",
    ]
    return "\n".join(lines) + "\n" + "\n".join(section.markdown() for section in sections)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    facts = machine()
    facts["load average (1/5/15 min) at the start"] = load_average()
    started_at = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    started = time.monotonic()
    print("# Machine\n" + "\n".join(f"- {k}: {v}" for k, v in facts.items()) + "\n", flush=True)
    work = Path(tempfile.mkdtemp(prefix="flare-bench-", dir=args.work_dir))
    sections = []
    try:
        needs_s3 = "snapshot" in args.benchmarks or ("overhead" in args.benchmarks and "s3" in args.stores)
        with local_s3(work) if needs_s3 else contextlib.nullcontext() as s3:
            for name in args.benchmarks:
                folder = work / name
                folder.mkdir()
                load_before, began = load_average(), time.monotonic()
                section = run_one(name, args, folder, s3)
                section.load_before, section.seconds, section.load_after = (
                    load_before, time.monotonic() - began, load_average())
                sections.append(section)
                print(section.markdown(), flush=True)
                shutil.rmtree(folder, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.out:
        args.out.write_text(results_markdown(sections, facts, started_at, time.monotonic() - started))
        print(f"Results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m fuzz [--seconds N] [TARGET ...]``: run each fuzz target for N seconds (``make fuzz``).

Each target runs in its own process (libFuzzer owns the process it fuzzes), from a corpus
kept under ``.venv/fuzz/<target>/corpus`` (seeded with real inputs, grown by every run);
a crashing input is written to ``.venv/fuzz/<target>/`` and the command exits non-zero.
Reproduce one with ``python -m fuzz.<target> <file>``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
from pathlib import Path

TARGETS = ("archives", "safetensors_header")
REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fuzz", description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="*", metavar="TARGET", help=f"any of {', '.join(TARGETS)} (default: all)")
    parser.add_argument("--seconds", type=int, default=60, help="time per target (default 60)")
    parser.add_argument("--work", type=Path, default=REPO / ".venv" / "fuzz", help="corpus and findings")
    args = parser.parse_args(argv)
    unknown = set(args.targets) - set(TARGETS)
    if unknown:
        parser.error(f"unknown target(s) {sorted(unknown)}; choose from {', '.join(TARGETS)}")
    failed = []
    for target in args.targets or TARGETS:
        work = args.work / target
        corpus = work / "corpus"
        corpus.mkdir(parents=True, exist_ok=True)
        if not any(corpus.iterdir()):
            for name, data in importlib.import_module(f"fuzz.{target}").seed_inputs().items():
                (corpus / f"seed-{name}").write_bytes(data)
        command = [sys.executable, "-m", f"fuzz.{target}", str(corpus), f"-max_total_time={args.seconds}",
                   f"-artifact_prefix={work}/", "-timeout=20", "-rss_limit_mb=4096", "-print_final_stats=1"]
        print(f"fuzz: {target} for {args.seconds} s (corpus {corpus})", flush=True)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        if subprocess.run(command, cwd=REPO, env=env).returncode != 0:
            failed.append(target)
    if failed:
        print(f"fuzz: findings in {', '.join(failed)} (inputs under {args.work})", file=sys.stderr)
        return 1
    print("fuzz: no findings")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Generate the Python modules of the wire contract from ``agent.proto``.

    python -m flare_provider.wire.codegen          # rewrite agent_pb2*.py beside the .proto
    python -m flare_provider.wire.codegen --check  # exit 1 when the committed files are stale

The proto path is taken from the repository root, so the generated service module
imports its messages as ``from flare_provider.wire import agent_pb2``. Needs grpcio-tools
(a test dependency); the generated files are committed, so installs never need it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

WIRE_DIR = Path(__file__).resolve().parent
PROTO_ROOT = WIRE_DIR.parent.parent  # the folder holding the flare_provider package
PROTOS = ("agent.proto",)


def _outputs(proto: str) -> list[str]:
    stem = Path(proto).stem
    return [f"{stem}_pb2.py", f"{stem}_pb2.pyi", f"{stem}_pb2_grpc.py"]


def generated_files() -> list[Path]:
    """The committed generated files, beside their .proto."""
    return [WIRE_DIR / name for proto in PROTOS for name in _outputs(proto)]


def generate(out_root: Path) -> list[Path]:
    """Run protoc with output under ``out_root`` (laid out like the repository root)."""
    from grpc_tools import protoc  # only needed here, not at run time

    include = Path(protoc.__file__).resolve().parent / "_proto"  # the well-known types
    relative = WIRE_DIR.relative_to(PROTO_ROOT)
    for proto in PROTOS:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={out_root}",
            f"--pyi_out={out_root}",
            f"--grpc_python_out={out_root}",
            (relative / proto).as_posix(),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {relative / proto}")
    return [out_root / relative / name for proto in PROTOS for name in _outputs(proto)]


def stale_files() -> list[str]:
    """Names of generated files that differ from what the .proto produces now."""
    with tempfile.TemporaryDirectory(prefix="flare-codegen-") as tmp:
        fresh = generate(Path(tmp))
        return [
            committed.name
            for committed, new in zip(generated_files(), fresh, strict=True)
            if not committed.is_file() or committed.read_bytes() != new.read_bytes()
        ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flare_provider.wire.codegen", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed generated files are stale")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        if stale:
            print(f"stale generated files in {WIRE_DIR}: {', '.join(stale)}; run python -m flare_provider.wire.codegen")
            return 1
        print("generated files are up to date")
        return 0
    for path in generate(PROTO_ROOT):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

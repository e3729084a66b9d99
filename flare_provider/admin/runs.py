"""``flare runs list``, ``flare runs download`` and ``flare model export``: the snapshot store, read.

What NVIDIA FLARE's ``list_jobs`` and ``download_job`` are to its job store: the runs of
every federation in a snapshot store (``--store file:///...`` or ``s3://bucket/prefix``;
S3 credentials from the standard AWS chain, ``--s3-endpoint`` for S3-compatible
servers), and a run, or one of its rounds, copied to a folder: the global model, the
round state and metrics (``state.json``), and whatever else is stored under the run
(TensorBoard event files, the ``FINAL`` marker). A committed round's files are checked
against its ``COMMIT`` record as they arrive; a round without one is left out.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .site_commands import AdminError, reported

if TYPE_CHECKING:
    from ..snapshots import SnapshotStore

STORE_ENV = "FLARE_SNAPSHOT_STORE"  # the store the commands read when --store is not given


def open_store(args: argparse.Namespace) -> "SnapshotStore":
    from ..snapshots import SnapshotStore

    uri = args.store or os.environ.get(STORE_ENV)
    if not uri:
        raise AdminError(f"no snapshot store: pass --store file:///path or s3://bucket/prefix, or set {STORE_ENV}")
    settings = {"endpoint_url": args.s3_endpoint} if getattr(args, "s3_endpoint", None) else None
    try:
        return SnapshotStore(uri, s3_settings=settings)
    except ValueError as exc:
        raise AdminError(str(exc)) from None


def find_run(store: "SnapshotStore", run: str, federation: str | None) -> tuple[str, str]:
    """(federation, run id) of ``run`` (``RUN`` or ``FEDERATION/RUN``); AdminError if none or ambiguous."""
    if federation is None and "/" in run:
        federation, run = run.split("/", 1)
    feds = [federation] if federation else store.list_federations()
    found = [f for f in feds if run in store.list_runs(f)]
    if not found:
        where = f"federation {federation!r}" if federation else "any federation"
        raise AdminError(f"no run {run!r} in {where} of {store.uri} (see flare runs list)")
    if len(found) > 1:
        raise AdminError(f"run {run!r} is in federations {found}: pass --federation or FEDERATION/RUN")
    return found[0], run


@reported
def cmd_runs_list(args: argparse.Namespace) -> int:
    store = open_store(args)
    from ..snapshots import SnapshotCorrupted

    rows = []
    for federation in [args.federation] if args.federation else store.list_federations():
        for run in store.list_runs(federation):
            rounds = store.list_rounds(federation, run)
            try:
                final = store.find_final(federation, run)
                final_text = "-" if final is None else str(final.round)
            except SnapshotCorrupted as exc:
                final_text = f"damaged ({exc})"
            latest = store.latest(federation, run) if rounds else None
            rows.append([federation, run, len(rounds), "-" if latest is None else latest.round, final_text,
                         "-" if latest is None else latest.committed_at])
    if not rows:
        print(f"no runs in {store.uri}")
        return 0
    from ..cli import _table

    print(_table(rows, ["federation", "run", "rounds", "latest", "final", "committed at"]))
    return 0


@reported
def cmd_runs_download(args: argparse.Namespace) -> int:
    from ..snapshots import SnapshotCorrupted
    from ..snapshots.layout import COMMIT_FILE, check
    from ..snapshots.naming import parse_round_folder

    store = open_store(args)
    federation, run = find_run(store, args.run, args.federation)
    rounds = store.list_rounds(federation, run)
    if args.round is not None and args.round not in rounds:
        raise AdminError(f"run {run!r} has no committed round {args.round} (committed: {rounds or 'none'})")
    dest = Path(args.output or run)
    if dest.exists() and any(dest.iterdir()):
        raise AdminError(f"{dest} is not empty; pass -o with a new folder")
    run_key = store.run_prefix(federation, run)  # the run's folder: everything under it is the run's
    committed: dict[int, dict] = {}
    for number in [args.round] if args.round is not None else rounds:
        try:
            committed[number] = store.get_round(federation, run, number).files
        except SnapshotCorrupted as exc:
            if args.round is not None:
                raise AdminError(str(exc)) from None
            print(f"warning: round {number} left out: {exc}", file=sys.stderr)  # the others are still worth having
    copied, skipped = 0, set()
    for key in store.backend.list_keys(run_key):
        folder, _, name = key.partition("/")
        number = parse_round_folder(folder) if name else None
        if number is not None and number not in committed:
            skipped.add(number)  # uncommitted, damaged, or another round than the one asked for
            continue
        target = dest / key
        target.parent.mkdir(parents=True, exist_ok=True)
        digest = store.backend.download(f"{run_key}/{key}", target)
        if digest is None:
            raise AdminError(f"{store.backend.uri(f'{run_key}/{key}')} vanished while it was downloaded")
        if number is not None and name != COMMIT_FILE and name in committed[number]:
            try:
                check(store.backend.uri(f"{run_key}/{folder}"), name, committed[number][name], digest)
            except SnapshotCorrupted as exc:
                raise AdminError(f"{exc}; {target} does not match what was committed") from None
        copied += 1
    which = f"round {args.round}" if args.round is not None else f"{len(committed)} committed round(s)"
    print(f"Downloaded run {run!r} of {federation!r} ({which}, {copied} files) to {dest}")
    if args.round is None and skipped:
        print(f"left out, not committed or damaged: round(s) {sorted(skipped)}")
    return 0


@reported
def cmd_model_export(args: argparse.Namespace) -> int:
    """A safetensors model (a file, a URI, or a run's round in a store) as a PyTorch state dict file."""
    import tempfile

    try:
        import torch
        from safetensors.torch import load_file
    except ImportError as exc:
        raise AdminError(f"model export needs PyTorch and safetensors ({exc}); pip install torch safetensors") from None
    output = Path(args.output)
    with tempfile.TemporaryDirectory(prefix="flare-export-") as staging:
        source, path = _model_file(args, Path(staging))
        try:
            state_dict = load_file(str(path))
        except Exception as exc:  # safetensors says what is wrong with the file, in its own error type
            raise AdminError(f"{source} is not a safetensors model: {exc}") from None
        output.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state_dict, output)
    size = sum(t.numel() for t in state_dict.values())
    print(f"Exported {source} ({len(state_dict)} tensors, {size} values) to {output}; "
          "load it with torch.load(path, weights_only=True)")
    return 0


def _model_file(args: argparse.Namespace, staging: Path) -> tuple[str, Path]:
    """(where the model came from, a local copy of it, verified where it came from a store)."""
    from ..snapshots import SnapshotCorrupted, SnapshotError

    if args.model and (args.run or args.store):
        raise AdminError("give either a MODEL file or URI, or --store with --run, not both")
    if args.model:
        text = args.model
        if text.startswith("s3://"):
            from ..snapshots.s3 import S3Backend, make_s3_client, parse_s3_uri

            bucket, key = parse_s3_uri(text)
            settings = {"endpoint_url": args.s3_endpoint} if args.s3_endpoint else None
            path = staging / "model.safetensors"
            try:
                if not S3Backend(make_s3_client(settings), bucket).download(key, path):
                    raise AdminError(f"{text} does not exist")
            except SnapshotError as exc:
                raise AdminError(str(exc)) from None
            return text, path
        if text.startswith("file:"):
            from ..snapshots.local import path_from_file_uri

            path = path_from_file_uri(text)
        else:
            path = Path(text)
        if not path.is_file():
            raise AdminError(f"{text} is not a file")
        return text, path
    if not args.run:
        raise AdminError("name a MODEL (a safetensors file or URI), or a run with --store URI --run RUN [--round N]")
    store = open_store(args)
    federation, run = find_run(store, args.run, args.federation)
    try:
        if args.round is not None:
            snapshot = store.get_round(federation, run, args.round)
        else:
            snapshot = store.find_final(federation, run) or store.latest(federation, run)
            if snapshot is None:
                raise AdminError(f"run {run!r} has no committed round")
        return snapshot.model_uri, store.download_weights(snapshot, staging / "model.safetensors")
    except SnapshotCorrupted as exc:
        raise AdminError(str(exc)) from None


def _store_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", help=f"the snapshot store: file:///path or s3://bucket/prefix (default: ${STORE_ENV})")
    parser.add_argument("--s3-endpoint", help="endpoint URL of an S3-compatible store (default: AWS)")
    parser.add_argument("--federation", help="the federation of the run (needed only when a run id is in two)")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    runs = sub.add_parser("runs", help="the runs in a snapshot store: list, download")
    runs = runs.add_subparsers(dest="runs_command", required=True)
    rl = runs.add_parser("list", help="every run of every federation: rounds committed, latest, final")
    _store_arguments(rl)
    rl.set_defaults(func=cmd_runs_list)
    rd = runs.add_parser("download", help="copy a run (or one round) to a folder: model, state, metrics, TensorBoard logs")
    rd.add_argument("run", help="run id, or FEDERATION/RUN")
    rd.add_argument("--round", type=int, help="only this round (and the run's files outside rounds)")
    rd.add_argument("-o", "--output", help="folder to write (default: ./RUN); must be new or empty")
    _store_arguments(rd)
    rd.set_defaults(func=cmd_runs_download)

    model = sub.add_parser("model", help="global models")
    model = model.add_subparsers(dest="model_command", required=True)
    me = model.add_parser("export", help="a safetensors model as a PyTorch state dict file (torch.save of tensors)")
    me.add_argument("model", nargs="?", help="a safetensors file, file:// or s3:// URI (or use --store and --run)")
    me.add_argument("-o", "--output", required=True, help="the .pt file to write")
    me.add_argument("--run", help="the run whose model to export (its final round, else its latest)")
    me.add_argument("--round", type=int, help="with --run: this round's model")
    _store_arguments(me)
    me.set_defaults(func=cmd_model_export)

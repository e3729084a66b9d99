"""``flare simulate``: the command line of the simulator (registered by :mod:`flare_provider.cli`).

Only argparse at import: the engine, the site runtime and PyTorch load once a simulation runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

USAGE = "flare simulate APP_DIR -w WORKSPACE -n SITES -r ROUNDS [--data DIR] [-t THREADS] [--gpus auto|none|0,1]"


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``simulate`` subcommand and its options, modelled on NVIDIA FLARE's ``nvflare simulator``."""
    s = sub.add_parser(
        "simulate",
        usage=USAGE,
        help="run an app's rounds with N simulated sites on this machine (no kits, no agents, no Airflow)",
        description="Run an app's federated rounds with simulated sites on local data folders: the same run engine, "
        "aggregators, site worker, privacy filters and snapshot layout as a real federation.",
    )
    s.add_argument("app_dir", metavar="APP_DIR", help="the app folder (app.yaml, custom/)")
    s.add_argument("-w", "--workspace", "--out", required=True,
                   help="folder for the sites' work folders, the app's copy, the built-in data and (by default) the snapshots")
    s.add_argument("-n", "--sites", type=int, dest="num_sites",
                   help="number of simulated sites (site-1...); with --data, defaults to one per folder there")
    s.add_argument("-r", "--rounds", type=int, default=1, dest="num_rounds", help="rounds to run (default 1)")
    s.add_argument("--data", type=Path, dest="data_root", metavar="DIR",
                   help="one data folder per site, named after the site (default: the built-in digits split)")
    s.add_argument("--iid", action="store_true", help="built-in digits: split uniformly instead of label-skewed")
    s.add_argument("--seed", type=int, default=0, help="built-in digits: the seed of the split (default 0)")
    s.add_argument("-t", "--threads", type=int, help="tasks run at once (default: the number of sites, at most the CPUs)")
    s.add_argument("--gpus", "-gpu", default="auto",
                   help="GPU ids handed to the sites in turn, 'none' for CPU only (default auto: the GPUs PyTorch sees)")
    s.add_argument("--snapshot-uri", help="snapshot store to commit the run to: file:///... or s3://bucket/prefix "
                   "(default: WORKSPACE/snapshots); name the Federation page's store to see the run there")
    s.add_argument("--federation", help="the name the run is filed under (default: <app>-simulation)")
    s.add_argument("--run-id", help="the run's id (default: simulate-<time>-<random>); an existing one is resumed")
    s.add_argument("--min-clients", type=int, help="results a round needs (default: every site)")
    s.add_argument("--aggregator", default="fedavg", help="aggregator name or class path (default fedavg)")
    s.add_argument("--aggregator-args", type=_json_object, default={}, metavar="JSON", help="its arguments, a JSON object")
    s.add_argument("--train-config", type=_json_object, default={}, metavar="JSON",
                   help="config sent to the trainers every round, a JSON object (e.g. '{\"epochs\": 1}')")
    s.add_argument("--initial-model", help="safetensors file or URI to start from, or 'previous' (default: the app builds it)")
    s.add_argument("--train-timeout", type=float, default=3600.0, help="seconds a round may take (default 3600)")
    s.add_argument("--privacy", type=Path, metavar="FILE",
                   help="YAML with the privacy filters every site applies (site.yaml's privacy: section, or a site.yaml)")
    s.add_argument("--evaluate", action="store_true", help="after the last round, have every site evaluate the final model")
    s.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    s.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    s.set_defaults(func=cmd_simulate)


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def cmd_simulate(args: argparse.Namespace) -> int:
    from ..federation.errors import RoundFailed
    from .options import SimulationError, SimulationOptions, parse_gpus, plan
    from .run import simulate

    logging.basicConfig(level=args.log_level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s", force=True)
    if args.log_level != "DEBUG":  # each site's task bookkeeping; the rounds say what matters
        logging.getLogger("site_agent").setLevel(logging.WARNING)
    try:
        options = SimulationOptions(
            app_dir=Path(args.app_dir), workspace=Path(args.workspace), num_rounds=args.num_rounds,
            num_sites=args.num_sites, data_root=args.data_root, iid=args.iid, seed=args.seed, threads=args.threads,
            gpus=parse_gpus(args.gpus), snapshot_uri=args.snapshot_uri, federation=args.federation, run_id=args.run_id,
            min_clients=args.min_clients, aggregator=args.aggregator, aggregator_args=args.aggregator_args,
            train_config=args.train_config, initial_model=args.initial_model, train_timeout=args.train_timeout,
            privacy=args.privacy, evaluate=args.evaluate,
        )
        result = simulate(plan(options))
    except SimulationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RoundFailed as exc:
        print(f"error: the simulation failed: {exc}", file=sys.stderr)
        return 1
    if args.json:
        doc = {
            "federation": result.federation, "run_id": result.run_id, "rounds_done": result.rounds_done,
            "snapshot_uri": result.snapshot_uri, "model_uri": result.model_uri, "final_metrics": result.metrics,
            "history": [record.to_dict() for record in result.history], "evaluation": result.evaluation,
        }
        print(json.dumps(doc, indent=2, default=str))
        return 0
    print(_summary(result))
    return 0


def _summary(result: Any) -> str:
    from ..cli import _table

    names = sorted({n for record in result.history for n in record.metrics}, key=lambda n: (not n.startswith("val"), n))
    rows = [
        [record.round, f"{len(record.accepted)}/{len(record.sites)}", record.num_samples, f"{record.duration_s:.1f}",
         *(f"{record.metrics[n]:.4f}" if n in record.metrics else "-" for n in names)]
        for record in result.history
    ]
    lines = [f"Simulated run {result.run_id} of {result.federation}: {result.rounds_done} rounds",
             _table(rows, ["round", "sites", "samples", "seconds", *names])]
    for record in result.history:
        for site, why in record.dropped.items():
            lines.append(f"round {record.round}: {site} dropped: {why}")
    if result.evaluation:
        lines.append(f"Final evaluation: {json.dumps(result.evaluation.get('global', {}), sort_keys=True)}")
    lines.append(f"Final model: {result.model_uri}")
    return "\n".join(lines)

"""Running a simulation: the workspace made, the sites started, the engine's rounds run.

The rounds are :class:`~flare_provider.federation.scatter_gather.ScatterGatherRun`'s, the
same code an Airflow task runs; only the client of each site is a
:class:`~flare_provider.simulator.sites.SimulatedClient`. The run is committed to a
snapshot store like any other (its state says ``simulator`` where an Airflow run says
``airflow``), so the Federation page lists it, and a simulation started again with the
same ``run_id`` takes the run up after its last committed round.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from ..client import CallerKit, SiteEndpoint
from ..federation.records import RoundRecord, RunSpec
from ..federation.scatter_gather import ScatterGatherRun
from ..snapshots import SnapshotStore
from ..wire.app_config import CUSTOM_DIR
from .options import SimulationError, SimulationPlan

log = logging.getLogger("flare_provider.simulator")

CALLER = "simulator"  # the name the sites see as the server's


@dataclass
class SimulationResult:
    """What a simulation did: where its rounds are, and the last round's metrics."""

    federation: str
    run_id: str
    rounds_done: int
    snapshot_uri: str  # the final round's commit
    model_uri: str
    metrics: dict[str, float]
    history: list[RoundRecord]
    evaluation: dict[str, Any] | None = field(default=None)


def simulate(plan: SimulationPlan, logger: logging.Logger | None = None) -> SimulationResult:
    """Run ``plan``'s rounds on its simulated sites; the engine's :class:`RoundFailed` if a round fails."""
    from site_agent.privacy import parse_policy
    from site_agent.runtime.app_store import AppInfo
    from site_agent.site_settings import SiteSettings

    from .sites import SimulatedApp, SimulatedSite, TaskSlots

    logger = logger or log
    options = plan.options
    sites: dict[str, SimulatedSite] = {}
    run = _engine(plan, sites, logger)  # checks the engine's options before anything is written
    try:
        _install_app(plan)
        if plan.builtin_digits:
            _write_digits(plan)
        has_custom_code = any(PurePosixPath(rel).parts[0] == CUSTOM_DIR for rel in plan.app_files)
        app = SimulatedApp(AppInfo(plan.app.name, plan.app_version, plan.app_dir, has_custom_code, time.time()))
        slots = TaskSlots(plan.threads)
        policy = parse_policy(plan.privacy)
        for name in plan.sites:
            settings = SiteSettings(
                data_dir=plan.data_dirs[name],
                work_dir=plan.site_dir(name),
                gpus=plan.gpus[name],
                allow_custom_code=True,  # the developer's own code, on the developer's machine
                # Each worker then gets cores / threads CPU threads, as an agent's do with this many slots.
                max_concurrent_cpu_tasks=plan.threads,
                privacy=policy,
            )
            sites[name] = SimulatedSite(name, settings, app, slots)
        logger.info("Simulating %s run %s: app %s (%s), %d sites, %d rounds, %d tasks at a time, snapshots in %s",
                    plan.federation, plan.run_id, plan.app.name, plan.app_version[:12], len(plan.sites),
                    options.num_rounds, plan.threads, run.store.uri)
        progress = run.run()
        uri = run.checkpoints.round_uri(progress.round)
        evaluation = run.evaluate(progress) if options.evaluate else None
        return SimulationResult(plan.federation, plan.run_id, progress.round, uri, f"{uri}/model.safetensors",
                                dict(progress.metrics), progress.history, evaluation)
    finally:
        run.close()
        for site in sites.values():
            site.close()


def _engine(plan: SimulationPlan, sites: Mapping[str, Any], logger: logging.Logger) -> ScatterGatherRun:
    """The run engine for ``plan``, its clients the simulated ``sites`` (filled in later)."""
    from .sites import SimulatedClient

    options = plan.options
    try:
        spec = RunSpec(
            federation=plan.federation,
            run_id=plan.run_id,
            app_name=plan.app.name,
            sites=plan.sites,
            num_rounds=options.num_rounds,
            min_clients=options.min_clients or len(plan.sites),
            wait_time_after_min_received=options.wait_time_after_min_received,
            train_timeout=options.train_timeout,
            aggregator=options.aggregator,
            aggregator_args=dict(options.aggregator_args),
            train_config=dict(options.train_config),
            app_version=plan.app_version,
        )
        store = SnapshotStore(plan.snapshot_uri)
    except ValueError as exc:
        raise SimulationError(str(exc)) from None
    # No certificates: the kit only names the sites; every call goes to a simulated client.
    kit = CallerKit(plan.federation, CALLER, "server", b"", b"", b"",
                    {name: SiteEndpoint(name, "simulated", 0) for name in plan.sites})
    extra_state = {"simulator": {"sites": len(plan.sites), "threads": plan.threads,
                                 "gpus": {s: list(g) for s, g in plan.gpus.items() if g},
                                 "data": "digits" if plan.builtin_digits else str(options.data_root)}}
    try:
        return ScatterGatherRun(spec, kit, store, initial_model=options.initial_model,
                                client_factory=lambda site: SimulatedClient(sites[site]), logger=logger,
                                extra_state=extra_state)
    except ValueError as exc:  # the aggregator's name or arguments
        raise SimulationError(f"--aggregator: {exc}") from None


def _install_app(plan: SimulationPlan) -> None:
    """Copy the app's files (those its bundle would carry) to where the sites run it from.

    The folder is named by the content hash, so one that exists holds these very files.
    """
    target = plan.app_dir
    if target.is_dir():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
    try:
        for rel, source in plan.app_files.items():
            dest = staging / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, dest)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_digits(plan: SimulationPlan) -> None:
    """Each site's share of the digits data, split as ``flare_provider.poc`` splits it for real agents."""
    try:
        from site_agent.datasets.digits import write_site_partitions

        write_site_partitions([plan.data_dirs[s] for s in plan.sites], non_iid=not plan.options.iid,
                              seed=plan.options.seed)
    except ImportError as exc:
        raise SimulationError(f"the built-in digits data needs scikit-learn ({exc}); install it, or give --data") from None
    except ValueError as exc:  # too many sites for the data set
        raise SimulationError(f"cannot split the digits data over {len(plan.sites)} sites: {exc}") from None

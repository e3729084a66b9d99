"""What a simulation is asked to do, checked before anything runs: :class:`SimulationOptions`.

:func:`plan` turns the options into a :class:`SimulationPlan` (the app as a bundle would
carry it, one data folder per site, the GPUs each site gets, how many tasks run at once,
where rounds are committed) or raises :class:`SimulationError` naming the option or the
file at fault. Nothing is written to the workspace until every check has passed.
No PyTorch here (unless asked to find the GPUs); the site's privacy parser only for ``--privacy``.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..wire.app_config import APP_CONFIG, AppConfig, load_app_config, trainer_is_custom
from ..wire.bundles import BundleError, content_hash
from ..wire.bundles import (
    app_files as files_of_app,
)

# The workspace, like NVIDIA FLARE's simulator workspace: one folder per part.
APPS_DIR = "apps"  # apps/<name>/<version>/: the app's files, as its bundle would carry them
DATA_DIR = "data"  # data/<site>/: the built-in digits split, when no data root is given
SITES_DIR = "sites"  # sites/<site>/: each site's work folder (tasks/, state/), as an agent's
SNAPSHOTS_DIR = "snapshots"  # the snapshot store, unless another is named
_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class SimulationError(ValueError):
    """Options or an app folder a simulation cannot run with; the message names which."""


@dataclass(frozen=True)
class SimulationOptions:
    """A simulation, as ``flare simulate`` takes it.

    :param data_root: a folder holding one data folder per site (the sites take their
        names); None: the built-in digits data, split over ``num_sites`` sites named
        ``site-1``... exactly as ``flare_provider.poc`` splits it for a local federation.
    :param threads: how many tasks run at once on this machine (default: the number of
        sites, at most the number of CPUs).
    :param gpus: GPU ids handed to the sites in turn (site ``i`` gets ``gpus[i % len]``);
        ``"auto"``: the GPUs PyTorch sees, none without them; ``()``: CPU only.
    :param iid: split the built-in digits uniformly (default: label-skewed, non-IID).
    :param seed: the seed of the built-in digits split.
    :param privacy: a YAML file with a site's privacy filters (what ``local/site.yaml``
        holds under ``privacy:``; a whole ``site.yaml`` works too): every site applies them.
    """

    app_dir: Path
    workspace: Path
    num_rounds: int = 1
    num_sites: int | None = None
    data_root: Path | None = None
    iid: bool = False
    seed: int = 0
    threads: int | None = None
    gpus: str | tuple[int, ...] = "auto"
    snapshot_uri: str | None = None
    federation: str | None = None
    run_id: str | None = None
    min_clients: int | None = None
    aggregator: str = "fedavg"
    aggregator_args: Mapping[str, Any] = field(default_factory=dict)
    train_config: Mapping[str, Any] = field(default_factory=dict)
    initial_model: str | None = None
    train_timeout: float = 3600.0
    wait_time_after_min_received: float = 10.0
    privacy: Path | None = None
    evaluate: bool = False  # after the last round, every site evaluates the final model


@dataclass(frozen=True)
class SimulationPlan:
    """The options resolved: everything :func:`~flare_provider.simulator.run.simulate` needs."""

    options: SimulationOptions
    app: AppConfig
    app_version: str
    app_files: dict[str, Path]  # relative path -> the file in the app folder
    sites: tuple[str, ...]
    data_dirs: dict[str, Path]  # site -> its data folder (made by the run for the built-in digits)
    builtin_digits: bool
    gpus: dict[str, tuple[int, ...]]  # site -> its GPU ids, () for CPU
    threads: int
    snapshot_uri: str
    federation: str
    run_id: str
    privacy: dict[str, Any] | None  # the sites' privacy section, as in site.yaml

    @property
    def workspace(self) -> Path:
        return self.options.workspace

    @property
    def app_dir(self) -> Path:
        """Where the sites run the app from."""
        return self.workspace / APPS_DIR / self.app.name / self.app_version

    def site_dir(self, site: str) -> Path:
        return self.workspace / SITES_DIR / site


def plan(options: SimulationOptions) -> SimulationPlan:
    """Check ``options`` and resolve them; :class:`SimulationError` names what is wrong."""
    if options.num_rounds < 1:
        raise SimulationError(f"--rounds must be at least 1, got {options.num_rounds}")
    if options.num_sites is not None and options.num_sites < 1:
        raise SimulationError(f"--sites must be at least 1, got {options.num_sites}")
    app, version, files = _check_app(Path(options.app_dir))
    sites, data_dirs = _sites(options)
    threads = options.threads if options.threads is not None else max(1, min(len(sites), os.cpu_count() or 1))
    if threads < 1:
        raise SimulationError(f"--threads must be at least 1, got {threads}")
    if options.min_clients is not None and not 1 <= options.min_clients <= len(sites):
        raise SimulationError(f"--min-clients must be between 1 and the number of sites ({len(sites)}), got {options.min_clients}")
    gpu_ids = _gpu_ids(options.gpus)
    gpus = {site: (gpu_ids[i % len(gpu_ids)],) if gpu_ids else () for i, site in enumerate(sites)}
    workspace = Path(options.workspace).resolve()
    if workspace.exists() and not workspace.is_dir():
        raise SimulationError(f"--workspace {workspace}: exists and is not a folder")
    if options.initial_model not in (None, "previous") and "://" not in options.initial_model:
        if not Path(options.initial_model).is_file():
            raise SimulationError(f"--initial-model {options.initial_model}: no such file")
    return SimulationPlan(
        options=replace(options, workspace=workspace),
        app=app,
        app_version=version,
        app_files=files,
        sites=sites,
        data_dirs=data_dirs,
        builtin_digits=options.data_root is None,
        gpus=gpus,
        threads=threads,
        snapshot_uri=options.snapshot_uri or (workspace / SNAPSHOTS_DIR).as_uri(),
        federation=options.federation or f"{app.name}-simulation",
        run_id=options.run_id or f"simulate-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}",
        privacy=_privacy(options.privacy),
    )


def _check_app(app_dir: Path) -> tuple[AppConfig, str, dict[str, Path]]:
    """The app's config, version (its bundle's content hash) and files, as a bundle would carry them."""
    import hashlib

    if not app_dir.is_dir():
        raise SimulationError(f"{app_dir}: not an app folder (it should hold {APP_CONFIG} and, for custom code, custom/)")
    try:
        config = load_app_config(app_dir)
        files = files_of_app(app_dir)
        hashes = {rel: hashlib.sha256(path.read_bytes()).hexdigest() for rel, path in files.items()}
        trainer_is_custom(config, hashes)  # a trainer no agent could load fails here, not in every task
    except BundleError as exc:
        raise SimulationError(f"{app_dir}: {exc}") from None
    return config, content_hash(hashes), files


def _sites(options: SimulationOptions) -> tuple[tuple[str, ...], dict[str, Path]]:
    if options.data_root is None:
        if options.num_sites is None:
            raise SimulationError("--sites is needed with the built-in digits data (or give --data, one folder per site)")
        sites = tuple(f"site-{i}" for i in range(1, options.num_sites + 1))
        workspace = Path(options.workspace).resolve()
        return sites, {site: workspace / DATA_DIR / site for site in sites}
    root = Path(options.data_root).resolve()
    if not root.is_dir():
        raise SimulationError(f"--data {root}: not a folder (it should hold one data folder per site)")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise SimulationError(f"--data {root}: holds no site folders (one folder per site, named after the site)")
    bad = [p.name for p in folders if not _SITE_NAME.match(p.name)]
    if bad:
        raise SimulationError(f"--data {root}: folder names {bad} cannot be site names (letters, digits, '.', '_', '-')")
    if options.num_sites is not None and options.num_sites != len(folders):
        raise SimulationError(
            f"--sites {options.num_sites} does not match --data {root}, which holds {len(folders)} site folders: "
            f"{[p.name for p in folders]}"
        )
    return tuple(p.name for p in folders), {p.name: p for p in folders}


def _gpu_ids(gpus: str | tuple[int, ...]) -> tuple[int, ...]:
    if gpus != "auto":
        return tuple(gpus)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:  # what this shell may use; the sites' workers get these ids
        ids = [part.strip() for part in visible.split(",") if part.strip()]
        if not all(i.isdigit() for i in ids):
            raise SimulationError(f"CUDA_VISIBLE_DEVICES={visible!r} does not list GPU ids; name them with --gpus 0,1")
        return tuple(int(i) for i in ids)
    try:
        import torch
    except ImportError:
        return ()
    return tuple(range(torch.cuda.device_count()))


def parse_gpus(text: str) -> str | tuple[int, ...]:
    """``--gpus``: ``auto``, ``none`` (CPU only) or a comma-separated list of GPU ids."""
    text = text.strip().lower()
    if text in ("auto", ""):
        return "auto"
    if text in ("none", "cpu"):
        return ()
    try:
        ids = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise SimulationError(f"--gpus must be auto, none or GPU ids such as 0,1; got {text!r}") from None
    if any(i < 0 for i in ids) or len(set(ids)) != len(ids):
        raise SimulationError(f"--gpus must list distinct non-negative GPU ids, got {text!r}")
    return ids


def _privacy(path: Path | None) -> dict[str, Any] | None:
    """The sites' privacy filters from a YAML file, checked as an agent checks its ``site.yaml``."""
    if path is None:
        return None
    import yaml

    from site_agent.privacy import PrivacyConfigError, parse_policy

    try:
        doc = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise SimulationError(f"--privacy {path}: cannot read it: {exc}") from None
    if isinstance(doc, Mapping) and "privacy" in doc:  # a whole site.yaml
        doc = doc["privacy"]
    try:
        return parse_policy(doc, f"--privacy {path}").to_dict()
    except PrivacyConfigError as exc:
        raise SimulationError(str(exc)) from None

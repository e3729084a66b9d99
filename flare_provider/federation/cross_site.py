"""Cross-site evaluation: every site scores the global model and the local models the sites let go.

No Airflow here: :class:`~flare_provider.operators.cross_site_eval.CrossSiteEvalOperator`
drives a :class:`CrossSiteEval`; what it keeps in the snapshot store, and the matrix
itself, are :mod:`.cross_site_matrix`'s.

A local model is kept only where its site allowed it: the agent marks every train result
with the site's ``share_local_model`` setting (``local/site.yaml``, off by default), and
the scatter-gather run keeps (:class:`SharedLocalModels`) the last round's results so
marked, as they left the site (after its privacy filters). A model its site did not allow
to be shared is never stored, so it is never sent to another site.

Each evaluation is a task whose id is derived from (run, round of the global model, site,
model): a retried task re-attaches to the evaluations the sites did already.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..client import AgentClient, AgentError, CallerKit
from ..files import file_digest, safe_name
from ..snapshots import SnapshotCorrupted, SnapshotStore
from ..wire.task_state import SHARE_LOCAL_MODEL_KEY
from ..wire.tensors import RESULT_KIND_KEY, TensorFile, save_file
from .communicator import SiteCommunicator, TaskOrder, for_each_site
from .cross_site_matrix import (
    GLOBAL_MODEL,
    LOCAL_INDEX,
    MATRIX_FILE,
    CrossSiteMatrix,
    cross_site_key,
    json_bytes,
    local_model_key,
)
from .errors import RoundFailed
from .records import RunSpec

log = logging.getLogger(__name__)

_MAX_TASK_ID = 128  # what an agent accepts
# Codes after which a site will not answer the next model either.
_UNREACHABLE = ("UNAVAILABLE", "DEADLINE_EXCEEDED")


# ---- the sites' local models, kept by the training run ---------------------------------


class SharedLocalModels:
    """The local models a run's sites allowed it to keep, from the round that may be its last.

    The run hands over each result as it arrives (:meth:`keep`, before the aggregator takes
    the file); once the last round is known to be the last, :meth:`publish` stores the
    models of the sites whose results were accepted, before that round is committed.
    """

    def __init__(self, store: SnapshotStore, federation: str, run: str, work_dir: Path, logger: logging.Logger | None = None):
        self.store = store
        self.federation = federation
        self.run = run
        self.work_dir = work_dir
        self.log = logger or log
        self._kept: dict[str, tuple[Path, dict[str, str]]] = {}
        self._declined: set[str] = set()

    def keep(self, site: str, path: Path, metadata: Mapping[str, str]) -> None:
        """Hold on to ``site``'s result if the site allowed it to be shared (a link, no copy, where it can)."""
        self.discard(site)
        if metadata.get(SHARE_LOCAL_MODEL_KEY) != "true":
            self._declined.add(site)
            return
        held = self.work_dir / f"local-{safe_name(site)}.safetensors"
        try:
            os.link(path, held)  # the aggregator may move or delete its file: this name stays
        except OSError:
            shutil.copyfile(path, held)
        self._kept[site] = (held, dict(metadata))

    def discard(self, site: str) -> None:
        """Forget ``site``'s result (rejected, or replaced by a later one)."""
        self._declined.discard(site)
        kept = self._kept.pop(site, None)
        if kept is not None:
            kept[0].unlink(missing_ok=True)

    def clear(self) -> None:
        for site in list(self._kept):
            self.discard(site)
        self._declined.clear()

    def publish(self, round_number: int, accepted: Iterable[str], global_weights: Mapping[str, Any]) -> list[str]:
        """Store the kept models of the ``accepted`` sites as the run's local models; their sites.

        ``global_weights`` is the model the round started from: a site that sent a difference
        shares the global model plus its difference, and tensors that are not the model's
        (a SCAFFOLD control variate) are left out. The index is written last and names only
        these models, so a model stored by an earlier try of the run and not shared now is
        not taken.
        """
        accepted = set(accepted)
        models: dict[str, dict[str, Any]] = {}
        for site in sorted(accepted & set(self._kept)):
            held, metadata = self._kept[site]
            path = _as_model(held, metadata, global_weights)
            sha256, size = file_digest(path)
            try:
                self.store.backend.put_file(local_model_key(self.federation, self.run, site), path, sha256)
            finally:
                if path != held:
                    path.unlink(missing_ok=True)
            models[site] = {"sha256": sha256, "size": size, "task_id": metadata.get("flare.task_id")}
        index = {"round": round_number, "models": models, "not_shared": sorted(accepted & self._declined)}
        self.store.backend.put_bytes(cross_site_key(self.federation, self.run, LOCAL_INDEX), json_bytes(index))
        self.clear()
        if models or index["not_shared"]:
            self.log.info("Round %d: kept the local models of %s for cross-site evaluation; not shared by their sites: %s",
                          round_number, sorted(models) or "no site", index["not_shared"] or "none")
        return sorted(models)


def _as_model(held: Path, metadata: Mapping[str, str], global_weights: Mapping[str, Any]) -> Path:
    """The file holding the site's model with exactly the global model's tensors."""
    is_difference = metadata.get(RESULT_KIND_KEY) == "difference"
    with TensorFile(held) as update:
        if not is_difference and set(update) == set(global_weights):
            return held
        tensors = {name: (global_weights[name] + update[name]) if is_difference else update[name] for name in global_weights}
    path = held.with_name(f"model-{held.name}")
    save_file(tensors, path, {RESULT_KIND_KEY: "weights", "flare.task_id": metadata.get("flare.task_id", "")}, durable=False)
    return path


# ---- the evaluation ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Model:
    name: str
    kind: str  # global or local
    round: int
    path: Path

    @property
    def task_kind(self) -> str:
        """The task id's suffix: which model a site is asked to score (global, or whose local one)."""
        return "xsite-global" if self.kind == "global" else f"xsite-local-{safe_name(self.name)}"


class CrossSiteEval:
    """Cross-site evaluation of one run: the global model of ``model_round`` (default: the run's
    final round, else its newest) and the run's shared local models, each scored by every site.

    :param sites: the sites that evaluate (default: every site of the kit).
    :param config: what each evaluate task's trainer gets as its config.
    :param eval_timeout: seconds one site may take to score one model.
    """

    def __init__(
        self,
        kit: CallerKit,
        store: SnapshotStore,
        federation: str,
        run_id: str,
        app_name: str,
        *,
        sites: Sequence[str] | None = None,
        model_round: int | None = None,
        app_version: str | None = None,
        config: Mapping[str, Any] | None = None,
        eval_timeout: float = 3600.0,
        connect_grace: float = 10.0,
        client_factory: Callable[[str], AgentClient] | None = None,
        logger: logging.Logger | None = None,
    ):
        sites = tuple(sites or sorted(kit.sites))
        unknown = [s for s in sites if s not in kit.sites]
        if unknown:
            raise ValueError(f"sites {unknown} are not in the server kit of {kit.project!r} (known: {sorted(kit.sites)})")
        # The run's identity gives the task ids; nothing is trained.
        self.spec = RunSpec(federation, run_id, app_name, sites, num_rounds=1, min_clients=1, train_timeout=eval_timeout,
                            app_version=app_version, connect_grace=connect_grace)
        self.store = store
        self.model_round = model_round
        self.config = dict(config or {})
        self.log = logger or log
        self._work = Path(tempfile.mkdtemp(prefix="flare-cross-site-"))
        self.sites = SiteCommunicator(kit, self._work, connect_grace=connect_grace, client_factory=client_factory, logger=self.log)

    def close(self) -> None:
        self.sites.close()
        shutil.rmtree(self._work, ignore_errors=True)

    def __enter__(self) -> "CrossSiteEval":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def matrix_uri(self) -> str:
        return self.store.backend.uri(cross_site_key(self.spec.federation, self.spec.run_id, MATRIX_FILE))

    def run(self) -> CrossSiteMatrix:
        """Score every model at every site, store the matrix with the run and return it."""
        spec = self.spec
        models, not_shared = self._models()
        self.log.info("Cross-site evaluation of %s run %s: models %s at sites %s", spec.federation, spec.run_id,
                      [m.name for m in models], list(spec.sites))
        outcomes = for_each_site(lambda site: self._evaluate_all(site, models), spec.sites)
        values: dict[str, dict[str, dict[str, float]]] = {m.name: {} for m in models}
        errors: dict[str, dict[str, str]] = {}
        samples: dict[str, int] = {}
        for site, outcome in outcomes.items():
            cells = outcome if isinstance(outcome, dict) else dict.fromkeys((m.name for m in models), outcome)
            for name, cell in cells.items():
                if isinstance(cell, BaseException):
                    errors.setdefault(name, {})[site] = " ".join(str(cell).split()) or type(cell).__name__
                else:
                    values[name][site] = cell[1]
                    samples[site] = cell[0]
        if not any(values.values()):
            raise RoundFailed(f"cross-site evaluation: no site scored any model: {errors}")
        metrics = sorted({metric for row in values.values() for cell in row.values() for metric in cell})
        matrix = CrossSiteMatrix(
            federation=spec.federation, run=spec.run_id,
            models=[{"name": m.name, "kind": m.kind, "round": m.round} for m in models],
            sites=list(spec.sites), metrics=metrics, values=values, num_samples=samples,
            errors={name: dict(sorted(row.items())) for name, row in errors.items()}, not_shared=not_shared,
            created_at=datetime.now(timezone.utc).isoformat(),
        )
        self.store.backend.put_bytes(cross_site_key(spec.federation, spec.run_id, MATRIX_FILE), json_bytes(matrix.to_dict()))
        self.log.info("Cross-site matrix stored at %s", self.matrix_uri)
        return matrix

    def _models(self) -> tuple[list[_Model], list[str]]:
        """The global model and the shared local models, fetched and checked; and the sites that shared none."""
        spec, store = self.spec, self.store
        if self.model_round is not None:
            snapshot = store.get_round(spec.federation, spec.run_id, self.model_round)
        else:
            snapshot = store.find_final(spec.federation, spec.run_id) or store.latest(spec.federation, spec.run_id)
        if snapshot is None:  # as the store says of a round that is not there
            raise SnapshotCorrupted(f"no committed round of run {spec.run_id!r} of {spec.federation!r} in {store.uri}")
        models = [_Model(GLOBAL_MODEL, "global", snapshot.round, store.download_weights(snapshot, self._work / "global.safetensors"))]
        index_key = cross_site_key(spec.federation, spec.run_id, LOCAL_INDEX)
        raw = store.backend.get_bytes(index_key)
        if raw is None:
            self.log.info("Run %s kept no local models: only the global model is evaluated", spec.run_id)
            return models, []
        try:
            index = json.loads(raw)
            shared, not_shared, local_round = dict(index["models"]), list(index.get("not_shared") or []), int(index["round"])
        except (ValueError, KeyError, TypeError) as exc:
            raise SnapshotCorrupted(f"{store.backend.uri(index_key)} is damaged: {exc}") from None
        for site in sorted(shared):
            key = local_model_key(spec.federation, spec.run_id, site)
            path = self._work / f"local-{safe_name(site)}.safetensors"
            got = store.backend.download(key, path)
            if got != (shared[site].get("sha256"), shared[site].get("size")):
                raise SnapshotCorrupted(f"{store.backend.uri(key)} is missing or does not match its SHA-256 in {LOCAL_INDEX}")
            # A site named like the global model keeps its own row.
            models.append(_Model(site if site != GLOBAL_MODEL else f"{site} (local)", "local", local_round, path))
        return models, sorted(not_shared)

    def _evaluate_all(self, site: str, models: list[_Model]) -> dict[str, tuple[int, dict[str, float]] | BaseException]:
        """``site`` scores each model in turn; once it cannot be reached, the rest are not tried."""
        cells: dict[str, tuple[int, dict[str, float]] | BaseException] = {}
        unreachable: AgentError | None = None
        for model in models:
            if unreachable is not None:
                cells[model.name] = unreachable
                continue
            try:
                cells[model.name] = self._evaluate(site, model)
            except (AgentError, RoundFailed) as exc:
                self.log.warning("Site %s could not score the %s model: %s", site, model.name, exc)
                cells[model.name] = exc
                if isinstance(exc, AgentError) and exc.code.name in _UNREACHABLE:
                    unreachable = exc
        return cells

    def _evaluate(self, site: str, model: _Model) -> tuple[int, dict[str, float]]:
        spec = self.spec
        config = {**self.config, "round": model.round, "cross_site_model": model.name}
        order = TaskOrder(spec.app_name, model.path, "evaluate", config, spec.app_version)
        task_id = spec.task_id(model.round, site, model.task_kind)
        if len(task_id) > _MAX_TASK_ID:  # long site names: the model is named by a digest instead
            task_id = spec.task_id(model.round, site, "xsite-" + hashlib.sha256(model.name.encode()).hexdigest()[:12])
        state = self.sites.run_to_end(site, task_id, order, spec.train_timeout)
        if state.result_available:
            self.sites.client(site).acknowledge(task_id)
        metrics = {k: v for k, v in state.metrics.items() if math.isfinite(v)}
        self.log.info("Site %s scored the %s model: %s", site, model.name, metrics)
        return state.num_samples, metrics

"""The cross-site matrix and where cross-site evaluation keeps things in the snapshot store.

Beside a run's rounds::

    <federation>/<run>/cross_site/local/<site>.safetensors  a site's model of the run's last round
    <federation>/<run>/cross_site/local/index.json          which of them are there (written last)
    <federation>/<run>/cross_site/matrix.json               the matrix: model x site x metric

Plain data, no numpy, gRPC or Airflow at import: the Federation page reads the matrix
with this module alone (:mod:`.cross_site` runs the evaluation).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from .records import numbers

CROSS_SITE_DIR = "cross_site"
MATRIX_FILE = "matrix.json"
LOCAL_INDEX = "local/index.json"
GLOBAL_MODEL = "global"
MODES = ("max", "min")


def cross_site_key(federation: str, run: str, name: str = "") -> str:
    """The store key of ``name`` in the run's ``cross_site`` folder (the folder itself without one)."""
    from ..snapshots.naming import encode_name  # the store's own names for federations and runs

    folder = f"{encode_name(federation, 'federation')}/{encode_name(run, 'run id')}/{CROSS_SITE_DIR}"
    return f"{folder}/{name}" if name else folder


def local_model_key(federation: str, run: str, site: str) -> str:
    from ..snapshots.naming import encode_name

    return cross_site_key(federation, run, f"local/{encode_name(site, 'site')}.safetensors")


def json_bytes(doc: Any) -> bytes:
    return (json.dumps(doc, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()


@dataclass
class CrossSiteMatrix:
    """Every model scored at every site: ``values[model][site][metric]``.

    ``models`` lists each model as ``{"name", "kind" ("global" or "local"), "round"}``;
    ``errors[model][site]`` says why a cell is empty; ``not_shared`` names the sites whose
    local model is not in it because the site did not allow sharing it.
    :meth:`from_dict` reads whatever the store holds without raising.
    """

    federation: str
    run: str
    models: list[dict[str, Any]]
    sites: list[str]
    metrics: list[str]
    values: dict[str, dict[str, dict[str, float]]]
    num_samples: dict[str, int] = field(default_factory=dict)  # site -> samples it evaluated on
    errors: dict[str, dict[str, str]] = field(default_factory=dict)
    not_shared: list[str] = field(default_factory=list)
    created_at: str = ""

    @property
    def model_names(self) -> list[str]:
        return [m["name"] for m in self.models]

    def mean(self, model: str, metric: str) -> float | None:
        """The mean of ``metric`` over the sites that scored ``model`` (each site counts once)."""
        values = [cell[metric] for cell in self.values.get(model, {}).values() if metric in cell]
        return sum(values) / len(values) if values else None

    def best(self, metric: str, mode: str = "max") -> tuple[str, float] | None:
        """The model with the best mean ``metric`` (the first such in :attr:`models`), or None."""
        scored = [(name, value) for name in self.model_names if (value := self.mean(name, metric)) is not None]
        if not scored:
            return None
        pick = max if mode == "max" else min
        return pick(scored, key=lambda item: item[1])

    def summary(self, uri: str, best_metric: str | None, best_mode: str = "max") -> dict[str, Any]:
        """What XCom carries: per model the mean of each metric over the sites, and the best model."""
        best = self.best(best_metric, best_mode) if best_metric else None
        return {
            "federation": self.federation,
            "run_id": self.run,
            "matrix_uri": uri,
            "sites": list(self.sites),
            "models": {
                m["name"]: {"kind": m["kind"], "round": m.get("round"),
                            "sites_evaluated": len(self.values.get(m["name"], {})),
                            "mean": {metric: v for metric in self.metrics if (v := self.mean(m["name"], metric)) is not None}}
                for m in self.models
            },
            "best": None if best is None else {"model": best[0], "metric": best_metric, "mode": best_mode, "value": best[1]},
            "not_shared": list(self.not_shared),
            "errors": sum(len(cells) for cells in self.errors.values()),
        }

    def to_dict(self) -> dict[str, Any]:
        return {"format": 1, **asdict(self)}

    @classmethod
    def from_dict(cls, doc: Any) -> "CrossSiteMatrix":
        doc = doc if isinstance(doc, Mapping) else {}

        def mapping(value: Any) -> Mapping[str, Any]:
            return value if isinstance(value, Mapping) else {}

        def names(value: Any) -> list[str]:
            return [str(v) for v in value if isinstance(v, str)] if isinstance(value, list) else []

        models = [{"name": m["name"], "kind": str(m.get("kind") or "local"),
                   "round": m["round"] if isinstance(m.get("round"), int) and not isinstance(m["round"], bool) else None}
                  for m in doc.get("models") or [] if isinstance(m, Mapping) and isinstance(m.get("name"), str)]
        return cls(
            federation=str(doc.get("federation") or ""),
            run=str(doc.get("run") or ""),
            models=models,
            sites=names(doc.get("sites")),
            metrics=names(doc.get("metrics")),
            values={str(m): {str(s): numbers(cell) for s, cell in mapping(row).items()}
                    for m, row in mapping(doc.get("values")).items()},
            num_samples={str(s): n for s, n in mapping(doc.get("num_samples")).items()
                         if isinstance(n, int) and not isinstance(n, bool)},
            errors={str(m): {str(s): str(why) for s, why in mapping(row).items()} for m, row in mapping(doc.get("errors")).items()},
            not_shared=names(doc.get("not_shared")),
            created_at=str(doc.get("created_at") or ""),
        )


def read_matrix(store: Any, federation: str, run: str) -> CrossSiteMatrix | None:
    """The run's matrix in ``store`` (a :class:`~flare_provider.snapshots.SnapshotStore`), or
    None before any cross-site evaluation of it."""
    key = cross_site_key(federation, run, MATRIX_FILE)
    raw = store.backend.get_bytes(key)
    if raw is None:
        return None
    try:
        return CrossSiteMatrix.from_dict(json.loads(raw))
    except ValueError as exc:
        from ..snapshots import SnapshotCorrupted

        raise SnapshotCorrupted(f"{store.backend.uri(key)} is not JSON: {exc}") from None

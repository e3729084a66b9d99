"""The streaming aggregator every algorithm builds on.

A round goes ``begin_round`` -> ``add`` (once per site, as results arrive) -> ``finish``.
``add`` validates the site's update file and folds it in; a bad update raises
:class:`UpdateRejected` and the round carries on without it. Server-side optimizer state
lives across rounds and is saved with ``state()`` / restored with ``load_state()``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..wire.tensors import TensorFile
from .spec import ModelSpec
from .validation import UpdateRejected, open_update, validate_update

UPDATE_KINDS = ("weights", "diff")


class AggregationError(RuntimeError):
    """A round that cannot produce a model, or an aggregator used out of order."""


@dataclass
class RoundStatus:
    """Who took part in a round: accepted sites with their sample counts, rejections with the reason."""

    round_number: int
    expected: tuple[str, ...]
    accepted: dict[str, int] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)

    @property
    def missing(self) -> list[str]:
        """Sites that have not reported (dropped, if the round is finished)."""
        return [s for s in self.expected if s not in self.accepted and s not in self.rejected]

    def as_dict(self) -> dict[str, Any]:
        return {
            "round": self.round_number,
            "accepted": dict(self.accepted),
            "rejected": dict(self.rejected),
            "missing": self.missing,
            "num_samples": sum(self.accepted.values()),
        }


def to_model_dtype(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Float64 aggregation results back in the model's dtype (integers rounded to nearest)."""
    values = np.asarray(values)
    if dtype.kind == "f":
        result = values.astype(dtype)
    elif dtype.kind == "b":
        result = values >= 0.5
    else:
        info = np.iinfo(dtype)
        result = np.clip(np.rint(values), info.min, info.max).astype(dtype)
    return np.asarray(result)  # numpy turns 0-d results into scalars; keep them arrays


class Aggregator(ABC):
    """Base class of all aggregators; see ``docs/aggregators.md`` for writing your own.

    :param spill_dir: folder for updates kept on disk during a round (default: the
        system temporary folder). Each round uses its own subfolder, removed at the end.
    :param max_update_bytes: the largest update file accepted; default: the model's
        tensor bytes plus room for the safetensors header.
    """

    #: the name the registry knows this aggregator by
    name: ClassVar[str] = "custom"

    def __init__(self, *, spill_dir: str | Path | None = None, max_update_bytes: int | None = None):
        if max_update_bytes is not None and (not isinstance(max_update_bytes, int) or max_update_bytes <= 0):
            raise ValueError(f"max_update_bytes must be a positive integer, got {max_update_bytes!r}")
        self._spill_root = Path(spill_dir) if spill_dir is not None else None
        self._max_update_bytes = max_update_bytes
        self._status: RoundStatus | None = None
        self._spec: ModelSpec | None = None
        self._global: Mapping[str, np.ndarray] = {}
        self._may_move = False
        self._nonfinite: Mapping[str, int] | None = None  # counts given with the update being added
        self._spill_dir: Path | None = None
        self._spill_cleanup: weakref.finalize | None = None
        #: the status of the last finished round
        self.last_round: RoundStatus | None = None

    # ---- what an algorithm may override -------------------------------------------------

    def parameters(self) -> dict[str, Any]:
        """The algorithm's hyperparameters (JSON-friendly), recorded in ``state()`` meta."""
        return {}

    def trainer_config(self) -> dict[str, Any]:
        """Extra round configuration sent to the trainers (for example FedProx's ``fedprox_mu``)."""
        return {}

    def outgoing_tensors(self) -> dict[str, np.ndarray]:
        """Tensors sent to the sites with this round's global model, under reserved names
        (SCAFFOLD's server control variate); asked for after ``begin_round``."""
        return {}

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Server-side state to snapshot: tensors (safetensors) and meta (JSON)."""
        return {}, {"algorithm": self.name, "parameters": self.parameters()}

    def load_state(self, tensors: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
        """Restore what ``state()`` returned, so that a resumed run continues exactly."""
        algorithm = meta.get("algorithm")
        if algorithm != self.name:
            raise ValueError(f"saved aggregator state is for {algorithm!r}, not {self.name!r}")
        if tensors:
            raise ValueError(f"{self.name} keeps no tensor state, but the saved state has {len(tensors)} tensors")

    def _start_round(self) -> None:
        """Prepare per-round accumulators; ``self._spec`` and ``self._global`` are set."""

    @abstractmethod
    def _accept(self, site: str, update_path: Path, num_samples: int, kind: str) -> None:
        """Take a site's update; raise :class:`UpdateRejected` if it does not validate."""

    def _on_rejected(self, site: str) -> None:
        """Called after ``site``'s update was rejected."""

    @abstractmethod
    def _aggregate(self) -> dict[str, np.ndarray]:
        """The new global weights from the accepted updates (at least one)."""

    # ---- the round ------------------------------------------------------------------------

    def begin_round(
        self, global_weights: Mapping[str, np.ndarray], round_number: int, expected_sites: Iterable[str]
    ) -> None:
        """Start a round from ``global_weights`` that ``expected_sites`` will report to.

        ``global_weights`` may be a :class:`~flare_provider.wire.tensors.TensorFile`: the
        round then reads the global model from that file when it needs it, tensor by
        tensor, instead of holding it in memory. An unfinished earlier round is discarded.
        """
        if self._status is not None:
            self.abort()
        if not isinstance(round_number, int) or isinstance(round_number, bool) or round_number < 0:
            raise ValueError(f"round_number must be a non-negative integer, got {round_number!r}")
        sites = list(expected_sites)
        if not sites or not all(isinstance(s, str) and s for s in sites):
            raise ValueError(f"expected_sites must be non-empty site names, got {sites!r}")
        if len(set(sites)) != len(sites):
            raise ValueError(f"expected_sites names a site twice: {sorted(sites)}")
        self._spec = ModelSpec.of(global_weights)
        # A file-backed model is immutable already; a dict is copied so the caller may change theirs.
        self._global = global_weights if isinstance(global_weights, TensorFile) else dict(global_weights)
        self._status = RoundStatus(round_number, tuple(sorted(sites)))
        try:
            self._start_round()
        except BaseException:
            self._end_round()
            raise

    def add(
        self, site: str, update_path: str | Path, num_samples: int, kind: str = "weights", *, move: bool = False,
        nonfinite: Mapping[str, int] | None = None,
    ) -> None:
        """Validate ``site``'s update (a safetensors file) and fold it into the round.

        ``kind`` is ``"weights"`` (the site's full weights) or ``"diff"`` (its weights minus
        the global weights it started from); ``num_samples`` weighs it. Raises
        :class:`UpdateRejected` for a bad update, an unexpected site or a second report;
        the round goes on. The file is not needed after this returns. ``move=True`` hands
        the file over: an update that must wait for its turn is then moved into the spill
        folder rather than copied (the file may be gone afterwards). ``nonfinite``: the
        file's NaN and infinite values per floating tensor, counted as it was received
        (:class:`~flare_provider.wire.finite_scan.FiniteScan`), so that it is not read
        once more to count them.
        """
        status = self._require_round()
        if site not in status.expected:
            raise UpdateRejected(site, f"is not a site of round {status.round_number}")
        if site in status.accepted or site in status.rejected:
            raise UpdateRejected(site, f"already reported in round {status.round_number}")
        try:
            if kind not in UPDATE_KINDS:
                raise UpdateRejected(site, f"kind {kind!r} is not one of {', '.join(UPDATE_KINDS)}")
            count = _sample_count(site, num_samples)
            self._may_move, self._nonfinite = move, nonfinite
            self._accept(site, Path(update_path), count, kind)
        except UpdateRejected as exc:
            status.rejected[site] = str(exc)
            self._on_rejected(site)
            raise
        finally:
            self._may_move, self._nonfinite = False, None
        status.accepted[site] = count

    def finish(self) -> dict[str, np.ndarray]:
        """The new global weights, in the model's dtypes. Sites that never reported are skipped."""
        status = self._require_round()
        if not status.accepted:
            self.abort()
            raise AggregationError(
                f"round {status.round_number}: no update was accepted"
                f" (rejected: {sorted(status.rejected) or 'none'}; missing: {status.missing or 'none'})"
            )
        try:
            return self._aggregate()
        finally:
            self.last_round = status
            self._end_round()

    def abort(self) -> None:
        """Drop the round in progress and whatever it kept on disk."""
        if self._status is not None:
            self.last_round = self._status
        self._end_round()

    @property
    def status(self) -> RoundStatus | None:
        """The round in progress, or None."""
        return self._status

    def close(self) -> None:
        self.abort()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # ---- helpers for algorithms -----------------------------------------------------------

    def _require_round(self) -> RoundStatus:
        if self._status is None:
            raise AggregationError("no round in progress; call begin_round() first")
        return self._status

    def _end_round(self) -> None:
        self._status = None
        self._global = {}
        if self._spill_cleanup is not None:
            self._spill_cleanup()
        self._spill_dir = self._spill_cleanup = None

    def _validate(self, site: str, path: Path) -> None:
        validate_update(self._spec, path, site=site, max_bytes=self._max_update_bytes, nonfinite=self._nonfinite)

    def _spill(self, site: str, update_path: Path) -> Path:
        """Copy an update into this round's spill folder and validate the copy.

        The copy is what gets aggregated later, so a caller deleting or rewriting its own
        file afterwards changes nothing. A file handed over with ``add(..., move=True)`` is
        renamed instead when it is on the same file system: no bytes are copied.
        """
        copy = self._spill_path(site)
        try:
            if not (self._may_move and _rename(update_path, copy)):
                shutil.copyfile(update_path, copy)
        except OSError as exc:
            copy.unlink(missing_ok=True)
            raise UpdateRejected(site, f"cannot read the update file: {exc.strerror or exc}") from None
        try:
            self._validate(site, copy)
        except UpdateRejected:
            copy.unlink(missing_ok=True)
            raise
        return copy

    def _spill_path(self, site: str) -> Path:
        """Where ``site``'s update is kept in this round's spill folder (made on first use)."""
        if self._spill_dir is None:
            if self._spill_root is not None:
                self._spill_root.mkdir(parents=True, exist_ok=True)
            self._spill_dir = Path(
                tempfile.mkdtemp(prefix=f"flare-round-{self._status.round_number}-", dir=self._spill_root)
            )
            self._spill_cleanup = weakref.finalize(self, shutil.rmtree, self._spill_dir, True)
        # Sites are named by their position: site names are not necessarily safe file names.
        return self._spill_dir / f"site-{self._status.expected.index(site):05d}.safetensors"

    def _open(self, site: str, path: Path) -> TensorFile:
        """An update file for reading tensor by tensor (``read(name, rows)``, ``blocks(name)``)."""
        return open_update(path, site)

    def _delta(
        self, tensors: TensorFile, name: str, kind: str, rows: slice | None = None, base: np.ndarray | None = None
    ) -> np.ndarray:
        """One tensor (or a block of its rows) of an update as float64 change from the global model.

        ``base`` is the global tensor (or those rows of it), when the caller has it at hand
        already: the global model may live in a file, and reading it again costs a pass.
        """
        values = tensors.read(name, rows)
        delta = np.empty(values.shape, np.float64)
        if kind == "weights":
            if base is None:
                base = self._global[name] if rows is None else self._global_rows(name, rows)
            np.subtract(values, base, out=delta, dtype=np.float64)  # one pass, straight into float64
        else:
            np.copyto(delta, values)
        return delta

    def _global_rows(self, name: str, rows: slice) -> np.ndarray:
        """Rows of a global tensor; only those are read when the global model is a file."""
        if isinstance(self._global, TensorFile):
            return self._global.read(name, rows)
        return self._global[name][rows]


def _rename(source: Path, target: Path) -> bool:
    """Move ``source`` to ``target`` if both are on one file system; False if that needs a copy."""
    try:
        os.replace(source, target)
        return True
    except OSError:
        return False


def _sample_count(site: str, num_samples: Any) -> int:
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples <= 0:
        raise UpdateRejected(site, f"num_samples must be a positive integer, got {num_samples!r}")
    return int(num_samples)

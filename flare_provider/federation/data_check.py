"""Checking the sites' data before a run trains: ``check_data`` of the run operators.

Before the first round every selected site runs a cheap ``describe`` task: its trainer's
``describe(ctx)`` summarizes the site's data (sample count and schema, never the data).
The run stops before any training when a site answers nothing usable, has fewer samples
than ``min_samples``, or (``schema: "equal"``) its schema differs from the others'; the
error names each such site and how it differs.

The outcome is recorded beside the run's rounds in the snapshot store
(``<federation>/<run>/data_check/result.json``), so a retried task that passed the check
does not ask again. A run cleared after a failed check asks again, under new task ids:
the sites' data may have been fixed meanwhile. No Airflow here.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

log = logging.getLogger(__name__)

SCHEMA_RULES = ("equal",)
_KEYS = ("schema", "min_samples", "timeout")
RECORD_FOLDER = "data_check"
RECORD_FILE = "result.json"
_TRANSIENT_CODES = ("UNAVAILABLE", "DEADLINE_EXCEEDED")


class DataCheckFailed(RuntimeError):
    """The sites' data do not pass the run's ``check_data``; a retry cannot change that."""


@dataclass(frozen=True)
class DataCheck:
    """What the sites' data must satisfy before a run trains.

    :param schema: ``"equal"``: every site's schema the same; None: not compared.
    :param min_samples: the fewest samples a site may have.
    :param timeout: seconds a site may take to answer.
    """

    schema: str | None = None
    min_samples: int = 0
    timeout: float = 300.0

    @classmethod
    def from_argument(cls, value: Any) -> "DataCheck | None":
        """``check_data`` as given to an operator (a mapping, or None / {} for no check); ValueError naming the problem."""
        if value is None or value == {}:
            return None
        if not isinstance(value, Mapping):
            raise ValueError(f"check_data must be a mapping such as {{'schema': 'equal', 'min_samples': 100}}, got {value!r}")
        unknown = sorted(set(value) - set(_KEYS), key=str)
        if unknown:
            raise ValueError(f"check_data: unknown key(s) {unknown}; known keys are {list(_KEYS)}")
        schema = value.get("schema")
        if schema is not None and schema not in SCHEMA_RULES:
            raise ValueError(f"check_data: schema must be one of {list(SCHEMA_RULES)} (or left out), got {schema!r}")
        min_samples = value.get("min_samples", 0)
        if isinstance(min_samples, bool) or not isinstance(min_samples, int) or min_samples < 0:
            raise ValueError(f"check_data: min_samples must be a whole number >= 0, got {min_samples!r}")
        timeout = value.get("timeout", cls.timeout)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValueError(f"check_data: timeout must be a number of seconds > 0, got {timeout!r}")
        return cls(schema, min_samples, float(timeout))


def check_problems(value: Any) -> list[str]:
    """What is wrong with a ``check_data`` argument (for the operators' checks at DAG parse time)."""
    try:
        DataCheck.from_argument(value)
    except ValueError as exc:
        return [str(exc)]
    return []


def judge(check: DataCheck, summaries: Mapping[str, Mapping[str, Any]], failures: Mapping[str, str]) -> list[str]:
    """Every problem with the sites' summaries (``{"num_samples", "schema"}`` by site), one line per site."""
    problems = [f"{site}: no data summary ({error})" for site, error in sorted(failures.items())]
    for site, summary in sorted(summaries.items()):
        if summary["num_samples"] < check.min_samples:
            problems.append(f"{site}: {summary['num_samples']} samples, fewer than min_samples={check.min_samples}")
    if check.schema == "equal" and summaries:
        groups: dict[str, list[str]] = {}
        for site, summary in sorted(summaries.items()):
            groups.setdefault(json.dumps(summary["schema"], sort_keys=True), []).append(site)
        if len(groups) > 1:
            # The schema most sites share is the reference; on a tie, the one of the first site by name.
            reference_sites = min(groups.values(), key=lambda sites: (-len(sites), sites[0]))
            reference = summaries[reference_sites[0]]["schema"]
            named = ", ".join(reference_sites)
            for site, summary in sorted(summaries.items()):
                if site not in reference_sites:
                    problems.append(f"{site}: schema differs from {named}'s: " + "; ".join(schema_differences(reference, summary["schema"])))
    return problems


def schema_differences(reference: Any, other: Any, path: str = "") -> list[str]:
    """How ``other`` differs from ``reference``, as ``where: what`` lines (at most a few dozen)."""
    where = path or "schema"
    if isinstance(reference, Mapping) and isinstance(other, Mapping):
        lines = [f"{_join(path, k)} missing" for k in sorted(set(reference) - set(other), key=str)]
        lines += [f"{_join(path, k)} not expected" for k in sorted(set(other) - set(reference), key=str)]
        for key in sorted(set(reference) & set(other), key=str):
            lines += schema_differences(reference[key], other[key], _join(path, key))
        return lines[:40]
    if reference != other:
        return [f"{where} is {json.dumps(other)} where expected {json.dumps(reference)}"]
    return []


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def ensure_data_checked(run: Any, check_data: Any, logger: logging.Logger | None = None) -> dict[str, Any] | None:
    """Check the data of ``run``'s sites once (a :class:`ScatterGatherRun` or :class:`CyclicRun`).

    Returns the record of the check (None without ``check_data``); raises
    :class:`DataCheckFailed` naming the sites at fault, or
    :class:`~flare_provider.federation.errors.RoundFailed` when a site could not be reached
    (a retry may reach it).
    """
    from ..snapshots.layout import json_bytes
    from ..snapshots.naming import encode_name
    from .communicator import TaskOrder, for_each_site
    from .errors import RoundFailed

    check = DataCheck.from_argument(check_data)
    if check is None:
        return None
    logger = logger or log
    spec, backend = run.spec, run.checkpoints.store.backend
    key = f"{encode_name(spec.federation, 'federation')}/{encode_name(spec.run_id, 'run id')}/{RECORD_FOLDER}/{RECORD_FILE}"
    earlier = _read_record(backend.get_bytes(key))
    if earlier.get("passed") and earlier.get("check") == asdict(check):
        logger.info("The sites' data passed this run's check already (%s); not asking again", ", ".join(sorted(earlier["sites"])))
        return earlier
    attempt = int(earlier.get("attempt", 0)) + 1
    kind = "describe" if attempt == 1 else f"describe-{attempt}"  # new ids: the sites' data may have changed
    order = TaskOrder(spec.app_name, None, "describe", {"run_key": spec.run_key}, spec.app_version, num_gpus=0)
    logger.info("Checking the data of sites %s before training (%s)", ", ".join(spec.sites), check)
    outcomes = for_each_site(lambda site: run.sites.run_to_end(site, spec.task_id(0, site, kind), order, check.timeout),
                             spec.sites)
    unreachable = {s: str(o) for s, o in outcomes.items() if getattr(getattr(o, "code", None), "name", "") in _TRANSIENT_CODES}
    if unreachable:
        raise RoundFailed("cannot check the sites' data: " + "; ".join(f"{s}: {e}" for s, e in sorted(unreachable.items())))
    summaries, failures = {}, {}
    for site, outcome in outcomes.items():
        if isinstance(outcome, BaseException):
            failures[site] = str(outcome)
            continue
        try:
            summary = json.loads(outcome.summary_json)
            summaries[site] = {"num_samples": int(summary["num_samples"]), "schema": summary["schema"]}
        except (ValueError, KeyError, TypeError):
            failures[site] = "its answer holds no data summary (an agent too old for data checks?)"
    problems = judge(check, summaries, failures)
    record = {"passed": not problems, "attempt": attempt, "check": asdict(check), "sites": summaries, "problems": problems}
    backend.put_bytes(key, json_bytes(record))
    if problems:
        raise DataCheckFailed(f"the sites' data failed the run's check_data, nothing was trained: {'; '.join(problems)}")
    logger.info("The sites' data passed the check: %s", {s: v["num_samples"] for s, v in sorted(summaries.items())})
    return record


def _read_record(raw: bytes | None) -> dict[str, Any]:
    try:
        record = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}

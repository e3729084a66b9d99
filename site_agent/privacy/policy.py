"""The site's privacy policy and how a request may tighten it: the site sets the floor.

``local/site.yaml`` holds the site's filters under ``privacy:``; an app (``privacy:`` in
its ``app.yaml``) and the server (``privacy`` in a task's config) may ask for more, in
the same format. Merging keeps, filter by filter and parameter by parameter, the stricter
of the two: a request may add a filter, add excluded variables or tighten a parameter.
A request to drop a site's filter (``null`` or ``false``), to loosen a parameter or to
choose the noise seed is refused: the site's setting stays and the refusal is recorded
with the result. A malformed request (an unknown filter or parameter, a bad value) fails
the task before it trains.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .base import NumericFilter, PrivacyConfigError
from .exclude import ExcludeVars
from .gaussian import GaussianFilter
from .percentile import PercentileFilter
from .svt import SVTFilter

# The filters by family, in the order they run: exclusion first, the noise last.
FILTERS: dict[str, type] = {
    ExcludeVars.family: ExcludeVars,
    PercentileFilter.family: PercentileFilter,
    SVTFilter.family: SVTFilter,
    GaussianFilter.family: GaussianFilter,
}
SEED = "seed"  # site.yaml only: makes the noise reproducible (tests); never taken from a request

Filter = ExcludeVars | NumericFilter


@dataclass(frozen=True)
class PrivacyPolicy:
    """The filters a result goes through, by family (run in :data:`FILTERS` order).

    ``sources`` says who set each filter's parameters: ``site``, ``app``, ``task``.
    """

    filters: Mapping[str, Filter] = field(default_factory=dict)
    seed: int | None = None
    sources: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.filters)

    def ordered(self) -> list[Filter]:
        return [self.filters[family] for family in FILTERS if family in self.filters]

    def to_dict(self) -> dict[str, Any]:
        """The ``site.yaml`` form, which :func:`parse_policy` reads back (the worker gets it so)."""
        doc: dict[str, Any] = {f.family: f.params() for f in self.ordered()}
        if self.seed is not None:
            doc[SEED] = self.seed
        return doc


def parse_policy(doc: Any, where: str = "site.yaml: privacy") -> PrivacyPolicy:
    """A site's policy from its ``privacy:`` mapping (None: no filters)."""
    if doc is None:
        return PrivacyPolicy()
    if not isinstance(doc, Mapping):
        raise PrivacyConfigError(f"{where}: expected a mapping of filters ({', '.join(FILTERS)}), found {doc!r}")
    unknown = sorted(set(doc) - set(FILTERS) - {SEED})
    if unknown:
        raise PrivacyConfigError(f"{where}: unknown filter(s) {unknown}; known filters are {list(FILTERS)}")
    seed = doc.get(SEED)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise PrivacyConfigError(f"{where}: 'seed' must be a non-negative integer, found {seed!r}")
    filters = {family: FILTERS[family].parse(doc[family], where) for family in FILTERS if family in doc}
    return PrivacyPolicy(filters, seed, {family: ("site",) for family in filters})


def tighten(policy: PrivacyPolicy, request: Any, source: str, where: str) -> tuple[PrivacyPolicy, list[str]]:
    """``policy`` made stricter by ``request`` from ``source`` (``app`` or ``task``); the refusals.

    Raises :class:`PrivacyConfigError` (naming ``where``) for a malformed request.
    """
    if request is None:
        return policy, []
    if not isinstance(request, Mapping):
        raise PrivacyConfigError(f"{where}: expected a mapping of filters ({', '.join(FILTERS)}), found {request!r}")
    unknown = sorted(set(request) - set(FILTERS) - {SEED})
    if unknown:
        raise PrivacyConfigError(f"{where}: unknown filter(s) {unknown}; this site knows {list(FILTERS)}")
    filters, sources, refused = dict(policy.filters), dict(policy.sources), []
    if SEED in request:
        refused.append(f"{where}: the noise seed is the site's alone to set; the request's seed is ignored")
    for family, wanted in request.items():
        if family == SEED:
            continue
        current = filters.get(family)
        if wanted is None or wanted is False:  # a request to drop the filter
            if current is not None:
                refused.append(f"{where}: dropping the site's '{family}' filter is not allowed; it stays")
            continue
        if current is None:
            filters[family] = FILTERS[family].parse(wanted, where)
            sources[family] = (source,)
            continue
        merged, no = current.tighten(wanted, where)
        refused += no
        if merged != current:
            filters[family] = merged
            sources[family] = tuple(dict.fromkeys((*sources.get(family, ()), source)))
    return PrivacyPolicy(filters, policy.seed, sources), refused


def effective_policy(
    site: Any, requests: list[tuple[str, Any, str]]
) -> tuple[PrivacyPolicy, list[str]]:
    """The site's policy (``site.yaml`` form) tightened by each ``(source, request, where)`` in turn."""
    policy, refused = parse_policy(site), []
    for source, request, where in requests:
        policy, no = tighten(policy, request, source, where)
        refused += no
    return policy, refused


def task_policy(job: Mapping[str, Any], app_yaml: Path) -> tuple[PrivacyPolicy, list[str]]:
    """The policy of one task: the site's (``job["privacy"]``, from ``site.yaml``), tightened by
    the app's ``privacy:`` in ``app.yaml`` and then by ``privacy`` in the task's config."""
    try:
        app_doc = yaml.safe_load(Path(app_yaml).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise PrivacyConfigError(f"{app_yaml}: cannot read the app's privacy request: {exc}") from None
    app_request = app_doc.get("privacy") if isinstance(app_doc, Mapping) else None
    task_request = (job.get("config") or {}).get("privacy")
    return effective_policy(
        job.get("privacy"),
        [("app", app_request, f"{Path(app_yaml).name}: privacy"), ("task", task_request, "task config: privacy")],
    )

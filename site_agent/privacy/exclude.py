"""Excluded variables: tensors whose trained values never leave the site.

A tensor is excluded when its name is listed in ``names`` or matches one of the regular
expressions in ``patterns`` (Python ``re.fullmatch``, so ``"fc\\..*"`` excludes every
tensor of ``fc``). A result tensor derived from a model tensor, named
``<kind>/<model tensor>`` (SCAFFOLD's ``scaffold.dc/fc.weight``), goes with its model
tensor: it is matched by the part after the first ``/`` as well. The site sends back, for an excluded tensor, exactly what it received:
the global values when the result holds full weights, zeros when it holds a difference.
Aggregators then see no change from this site there, and the layout of the model stays
whole. A request may add names and patterns; it can remove none.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from .base import PrivacyConfigError


@dataclass(frozen=True)
class ExcludeVars:
    names: tuple[str, ...] = ()
    patterns: tuple[str, ...] = ()

    family: ClassVar[str] = "exclude_vars"

    @classmethod
    def parse(cls, doc: Any, where: str) -> "ExcludeVars":
        if not isinstance(doc, Mapping) or not doc or set(doc) - {"names", "patterns"}:
            raise PrivacyConfigError(f"{where}: 'exclude_vars' must be a mapping with 'names' and/or 'patterns' (lists)")
        names = _strings(doc.get("names", []), f"{where}: exclude_vars.names")
        patterns = _strings(doc.get("patterns", []), f"{where}: exclude_vars.patterns")
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise PrivacyConfigError(f"{where}: exclude_vars.patterns: {pattern!r} is not a regular expression ({exc})") from None
        if not names and not patterns:
            raise PrivacyConfigError(f"{where}: 'exclude_vars' lists no names and no patterns")
        return cls(names, patterns)

    def params(self) -> dict[str, Any]:
        return {"names": list(self.names), "patterns": list(self.patterns)}

    def tighten(self, request: Any, where: str) -> tuple["ExcludeVars", list[str]]:
        """The union of both lists: a request can only keep more at home."""
        more = ExcludeVars.parse(request, where)
        names = tuple(dict.fromkeys((*self.names, *more.names)))
        patterns = tuple(dict.fromkeys((*self.patterns, *more.patterns)))
        return ExcludeVars(names, patterns), []

    def matches(self, tensor_names: Iterable[str]) -> list[str]:
        """The tensors of ``tensor_names`` this filter keeps at home, in their order."""
        compiled = [re.compile(p) for p in self.patterns]
        listed = set(self.names)
        def excluded(name: str) -> bool:
            return any(n in listed or any(p.fullmatch(n) for p in compiled) for n in {name, name.partition("/")[2]} if n)

        return [n for n in tensor_names if excluded(n)]


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise PrivacyConfigError(f"{where} must be a list of non-empty strings, found {value!r}")
    return tuple(value)

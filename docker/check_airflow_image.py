"""Build-time check of the Airflow image: the provider is registered and imports without PyTorch.

Exit status 0 when all is well; otherwise 1, with one line per problem.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import sys

ENTRY_POINT_GROUP = "apache_airflow_provider"
ENTRY_POINT_VALUE = "flare_provider.get_provider_info:get_provider_info"
MODULE_KINDS = ("operators", "sensors", "hooks", "triggers")


def provider_modules() -> list[str]:
    """The modules the provider declares to Airflow."""
    from flare_provider.get_provider_info import get_provider_info

    info = get_provider_info()
    return [module for kind in MODULE_KINDS for entry in info.get(kind, []) for module in entry["python-modules"]]


def problems() -> list[str]:
    found = []
    if importlib.util.find_spec("torch") is not None:
        found.append("torch is installed; the Airflow image must not carry PyTorch")
    points = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    if not any(point.value == ENTRY_POINT_VALUE for point in points):
        found.append(f"no {ENTRY_POINT_GROUP} entry point {ENTRY_POINT_VALUE}: Airflow would not see the provider")
    for module in provider_modules():
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - any failure to import is what this check reports
            found.append(f"{module} does not import: {type(exc).__name__}: {exc}")
    if "torch" in sys.modules:
        found.append("importing the provider's Airflow modules imported torch")
    return found


def main() -> int:
    found = problems()
    for problem in found:
        print(f"image check failed: {problem}", file=sys.stderr)
    if not found:
        print(f"image check passed: {len(provider_modules())} provider modules import without PyTorch")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())

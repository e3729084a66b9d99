"""An app's ``app.yaml``: its name, and the trainer class or training script it runs.

::

    name: digits                     # 1-64 letters, digits, '.', '_' or '-'
    description: ...                 # optional
    trainer:                         # a trainer class, built in or under custom/ ...
      path: site_agent.trainers.pytorch.PyTorchClassifier
      args: {...}
    script: custom/train.py          # ... or a training script using site_agent.client
    script_args: [--lr, 0.1]
    requirements: [scikit-learn>=1.3]  # checked by each site before a task runs

Parsed the same way where a bundle is built (Airflow side) and where it is verified and
run (each site), so both sides refuse the same mistakes with the same words.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

APP_CONFIG = "app.yaml"
CUSTOM_DIR = "custom"
BUILTIN_TRAINERS = "site_agent.trainers."

APP_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
_DOTTED_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+\Z")


class BundleError(ValueError):
    """A bundle that cannot be built or must not be deployed; nothing was written."""


@dataclass(frozen=True)
class AppConfig:
    """An app's ``app.yaml``: which trainer (or training script) runs and with what arguments."""

    name: str
    trainer_path: str  # "module.Class": a built-in trainer or one under custom/; "" for a script app
    trainer_args: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    script: str = ""  # a script app: its training script, "custom/<path>.py" (then no trainer)
    script_args: tuple[str, ...] = ()  # the script's command-line arguments (sys.argv[1:])
    requirements: tuple[str, ...] = ()  # Python packages the app needs (PEP 508), checked by each site



# ---- app.yaml --------------------------------------------------------------------


def parse_app_config(text: str, source: str = APP_CONFIG) -> AppConfig:
    """Validate ``app.yaml`` text; raises :class:`BundleError` naming the field."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise BundleError(f"{source}: not valid YAML: {exc}") from None
    except RecursionError:
        raise BundleError(f"{source}: not valid YAML: nested too deeply") from None
    except ValueError as exc:  # e.g. an integer of thousands of digits
        raise BundleError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise BundleError(f"{source}: expected a mapping with 'name' and 'trainer' (or 'script')")
    name = doc.get("name")
    if not isinstance(name, str) or not APP_NAME_RE.match(name):
        raise BundleError(f"{source}: 'name' must be 1-64 letters, digits, '.', '_' or '-', found {name!r}")
    description = doc.get("description") or ""
    if not isinstance(description, str):
        raise BundleError(f"{source}: 'description' must be text")
    requirements = _parse_requirements(doc.get("requirements"), source)
    has_trainer, has_script = doc.get("trainer") is not None, doc.get("script") is not None
    if has_trainer and has_script:
        raise BundleError(f"{source}: give either 'trainer' (a trainer class) or 'script' (a training script), not both")
    if not has_trainer and not has_script:
        raise BundleError(f"{source}: the app needs 'trainer' (a trainer class) or 'script' (a training script under {CUSTOM_DIR}/)")
    if has_script:
        script, script_args = _parse_script(doc, source)
        return AppConfig(name=name, trainer_path="", description=description, script=script, script_args=script_args,
                         requirements=requirements)
    if "script_args" in doc:
        raise BundleError(f"{source}: 'script_args' belongs to a script app; a trainer takes 'trainer.args'")
    trainer = doc.get("trainer")
    if not isinstance(trainer, dict):
        raise BundleError(f"{source}: 'trainer' must be a mapping with 'path' (module.Class) and optional 'args'")
    path = trainer.get("path")
    if not isinstance(path, str) or not _DOTTED_RE.match(path):
        raise BundleError(f"{source}: 'trainer.path' must be a dotted name such as module.Class, found {path!r}")
    args = trainer.get("args") or {}
    if not isinstance(args, dict):
        raise BundleError(f"{source}: 'trainer.args' must be a mapping of keyword arguments")
    return AppConfig(name=name, trainer_path=path, trainer_args=args, description=description, requirements=requirements)


def _parse_requirements(value: Any, source: str) -> tuple[str, ...]:
    """``requirements``: PEP 508 lines such as ``scikit-learn>=1.3``; each site decides whether it has them."""
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(r, str) and r.strip() for r in value):
        raise BundleError(f"{source}: 'requirements' must be a list of Python requirements such as ['scikit-learn>=1.3'], found {value!r}")
    from packaging.requirements import InvalidRequirement, Requirement

    for text in value:
        try:
            requirement = Requirement(text)
        except InvalidRequirement as exc:
            raise BundleError(f"{source}: requirement {text!r} is not valid: {exc}") from None
        if requirement.url:
            raise BundleError(f"{source}: requirement {text!r} names a URL; list a package and version, the site provides it")
    return tuple(r.strip() for r in value)


def _parse_script(doc: dict[str, Any], source: str) -> tuple[str, tuple[str, ...]]:
    """``script`` and ``script_args`` of a script app. The script must lie under custom/: it
    is custom code, and whatever is there counts as such for the site's BYOC setting."""
    script = doc["script"]
    parts = PurePosixPath(script).parts if isinstance(script, str) else ()
    if (len(parts) < 2 or parts[0] != CUSTOM_DIR or not script.endswith(".py") or "\\" in script
            or any(part in ("..", ".") for part in parts) or PurePosixPath(script).as_posix() != script):
        raise BundleError(f"{source}: 'script' must be a .py file under {CUSTOM_DIR}/ (e.g. {CUSTOM_DIR}/train.py), found {script!r}")
    args = doc.get("script_args") or []
    if not isinstance(args, list) or not all(isinstance(a, (str, int, float)) and not isinstance(a, bool) for a in args):
        raise BundleError(f"{source}: 'script_args' must be a list of command-line arguments (text or numbers), found {args!r}")
    return script, tuple(str(a) for a in args)


def load_app_config(app_dir: Path) -> AppConfig:
    path = Path(app_dir) / APP_CONFIG
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path}: cannot read the app's config: {exc}") from None
    return parse_app_config(text, str(path))


def custom_modules(files: dict[str, str] | list[str]) -> set[str]:
    """Top-level module names that an app's ``custom/`` folder provides."""
    names = set()
    for rel in files:
        parts = PurePosixPath(rel).parts
        if len(parts) >= 2 and parts[0] == CUSTOM_DIR:
            top = parts[1]
            if len(parts) > 2 or top.endswith(".py"):
                names.add(top.removesuffix(".py"))
    return names


def trainer_is_custom(config: AppConfig, files: dict[str, str] | list[str]) -> bool:
    """Whether the trainer comes from the app's custom code; raises if it comes from nowhere allowed."""
    if config.script:  # always custom code; it must be among the app's files
        if config.script not in files:
            raise BundleError(f"script {config.script!r} is not a file of the app")
        return True
    if config.trainer_path.split(".", 1)[0] in custom_modules(files):
        return True
    if config.trainer_path.startswith(BUILTIN_TRAINERS):
        return False
    raise BundleError(
        f"trainer {config.trainer_path!r} is neither a built-in trainer ({BUILTIN_TRAINERS}*) "
        f"nor a module in the app's {CUSTOM_DIR}/ folder"
    )

"""Reading the project's container files without Docker: Dockerfiles, compose files, ignores.

The parsing here covers what the project's own files use (stages, ARG defaults in FROM,
line continuations, exec-form JSON, ``*`` plus ``!`` exceptions in .dockerignore); it is
not a general Dockerfile or compose implementation.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import tomllib
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
AGENT_DOCKERFILE = DOCKER / "agent.Dockerfile"
AIRFLOW_DOCKERFILE = DOCKER / "airflow.Dockerfile"
COMPOSE_FILE = DOCKER / "compose.yaml"
GPU_COMPOSE_FILE = DOCKER / "compose.gpu.yaml"
COMPOSE_PROJECT_FILE = DOCKER / "project.yml"
EXAMPLE_ENV = DOCKER / "example.env"
AIRFLOW_CONFIG_YML = "config_templates/config.yml"
# The agent image's contract, shared by the kit's docker.sh and compose's agents: mount
# targets and their modes.
KIT_MOUNTS = {"/kit/startup": "ro", "/kit/local": "ro", "/data": "ro", "/work": "rw"}

# Options of provider packages that the official Airflow image carries and this test
# environment does not install (celery, cncf.kubernetes), as their provider.yaml names them.
PROVIDER_OPTIONS = {
    "celery": {"broker_url", "result_backend", "worker_concurrency", "task_acks_late", "worker_prefetch_multiplier"},
    "celery_broker_transport_options": {"visibility_timeout"},
    "kubernetes_executor": {"namespace", "pod_template_file", "delete_worker_pods", "worker_container_repository"},
}


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case
    args: str
    line: int

    def flags_and_words(self) -> tuple[dict[str, str], list[str]]:
        """``--name=value`` flags (repeatable ones keep the last value) and the other words."""
        flags, words = {}, []
        for word in shlex.split(self.args):
            if word.startswith("--") and not words:
                name, _, value = word[2:].partition("=")
                flags[name] = value
            else:
                words.append(word)
        return flags, words

    def mounts(self) -> list[dict[str, str]]:
        """The ``--mount=`` options of a RUN, as key/value mappings."""
        found = re.findall(r"--mount=(\S+)", self.args)
        return [dict(part.split("=", 1) for part in mount.split(",")) for mount in found]

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form ENTRYPOINT/CMD (or HEALTHCHECK's CMD), else None."""
        text = self.args
        if self.keyword == "HEALTHCHECK":
            text = re.sub(r"^(--\S+\s+)*CMD\s+", "", text)
        if not text.startswith("["):
            return None
        value = json.loads(text)
        return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


@dataclass
class Dockerfile:
    path: Path
    global_args: dict[str, str]
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def chain(self, stage: Stage) -> list[Stage]:
        """``stage`` and the stages it is built FROM, base first."""
        names = {s.name for s in self.stages}
        chain = [stage]
        while chain[0].base in names:
            chain.insert(0, self.stage(chain[0].base))
        return chain

    def effective(self, stage: Stage, keyword: str) -> Instruction | None:
        """The instruction that is in force for ``stage`` (the last one along its chain)."""
        found = [i for s in self.chain(stage) for i in s.all(keyword)]
        return found[-1] if found else None

    def image_of(self, stage: Stage) -> str:
        """The external base image ``stage`` starts from, ARG defaults filled in."""
        base = self.chain(stage)[0].base
        return re.sub(r"\$\{(\w+)\}", lambda m: self.global_args[m.group(1)], base)


def _logical_lines(text: str):
    """(first line number, instruction text) with continuations joined and comments dropped."""
    parts: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # also inside a continued instruction, as Docker does
        start = start or number
        if line.endswith("\\"):
            parts.append(line[:-1].strip())
            continue
        parts.append(line)
        yield start, " ".join(p for p in parts if p)
        parts, start = [], 0
    if parts:
        raise ValueError(f"the last instruction (line {start}) ends with a continuation")


def parse_dockerfile(path: Path) -> Dockerfile:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for number, text in _logical_lines(path.read_text()):
        keyword, _, args = text.partition(" ")
        instruction = Instruction(keyword.upper(), args.strip(), number)
        if instruction.keyword == "FROM":
            words = instruction.flags_and_words()[1]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], name=name))
        elif not stages:
            if instruction.keyword != "ARG":
                raise ValueError(f"{path}:{number}: only ARG may come before the first FROM")
            key, _, default = instruction.args.partition("=")
            global_args[key] = default
        else:
            stages[-1].instructions.append(instruction)
    return Dockerfile(path, global_args, stages)


def dockerignore_for(dockerfile: Path) -> Path:
    """The Dockerfile's own ignore file, which BuildKit prefers to the context's."""
    return dockerfile.with_name(dockerfile.name + ".dockerignore")


def dockerignore_includes(ignore_file: Path, path: str) -> bool:
    """Whether ``path`` (relative to the context) stays in a ``*`` plus ``!exception`` context."""
    lines = [line.strip() for line in ignore_file.read_text().splitlines()]
    patterns = [line for line in lines if line and not line.startswith("#")]
    if patterns[0] != "*":
        raise ValueError(f"{ignore_file}: expected to start by ignoring everything ('*')")
    path = path.rstrip("/")
    return any(
        path == allowed or path.startswith(allowed + "/")
        for allowed in (p[1:].rstrip("/") for p in patterns if p.startswith("!"))
    )


def load_yaml(path: Path) -> dict:
    with path.open() as f:
        return yaml.safe_load(f)


def pyproject() -> dict:
    with (REPO / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)


def console_scripts() -> set[str]:
    return set(pyproject()["project"]["scripts"])


def constraint_pins() -> dict[str, str]:
    """Package name (lower case) to pinned version, from constraints/test.txt."""
    pins = {}
    for line in (REPO / "constraints" / "test.txt").read_text().splitlines():
        name, sep, version = line.strip().partition("==")
        if sep and not name.startswith("#"):
            pins[name.lower()] = version
    return pins


def airflow_options() -> dict[str, set[str]]:
    """Every ``[section] option`` the installed Airflow knows, plus PROVIDER_OPTIONS."""
    import airflow

    doc = load_yaml(Path(airflow.__file__).parent / AIRFLOW_CONFIG_YML)
    options = {section: set(body.get("options") or {}) for section, body in doc.items()}
    for section, names in PROVIDER_OPTIONS.items():
        options.setdefault(section, set()).update(names)
    return options


def compose_variables(text: str) -> dict[str, str]:
    """``${VAR}``, ``${VAR:-default}`` and ``${VAR:?message}`` uses: name to the operator used."""
    found: dict[str, str] = {}
    for name, operator in re.findall(r"(?<!\$)\$\{(\w+)(:?[-?])?", text):
        if operator or name not in found:
            found[name] = operator
    return found


def split_volume(spec: str) -> tuple[str, str, str]:
    """A short-syntax volume: (source, target, mode)."""
    parts = spec.split(":")
    if len(parts) == 2:
        parts.append("rw")
    source, target, mode = parts
    return source, target, mode

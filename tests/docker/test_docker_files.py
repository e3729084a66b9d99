"""The container files, checked without building: Dockerfiles, compose files, deployment docs.

Every path, stage, program and setting these files name must exist in the project, the
installed Airflow or the pinned versions; the Dockerfiles must pass hadolint.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
from container_files import (
    AGENT_DOCKERFILE,
    AIRFLOW_DOCKERFILE,
    COMPOSE_FILE,
    COMPOSE_PROJECT_FILE,
    DOCKER,
    EXAMPLE_ENV,
    GPU_COMPOSE_FILE,
    KIT_MOUNTS,
    REPO,
    airflow_options,
    compose_variables,
    console_scripts,
    constraint_pins,
    dockerignore_for,
    dockerignore_includes,
    load_yaml,
    parse_dockerfile,
    pyproject,
    split_volume,
)

from flare_provider.provisioning import load_project

DOCKERFILES = [AGENT_DOCKERFILE, AIRFLOW_DOCKERFILE]
BIN = Path(sys.executable).parent
AIRFLOW_COMMANDS = {"api-server", "scheduler", "dag-processor", "triggerer", "celery worker"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_yaml(COMPOSE_FILE)


@pytest.fixture(scope="module")
def services(compose) -> dict[str, dict]:
    return compose["services"]


@pytest.fixture(scope="module")
def compose_project():
    return load_project(COMPOSE_PROJECT_FILE)


def dockerfile_of(service: dict) -> Path | None:
    build = service.get("build")
    if build is None:
        return None
    return (DOCKER / build["context"] / build.get("dockerfile", "Dockerfile")).resolve()


def image_stage(service: dict):
    """The parsed Dockerfile and stage a service's image is built from."""
    dockerfile = parse_dockerfile(dockerfile_of(service))
    target = service["build"].get("target")
    return dockerfile, dockerfile.stage(target) if target else dockerfile.final


def installed_programs(dockerfile, stage) -> set[str]:
    """Programs the Dockerfile puts on PATH: COPY destinations under /usr/local/bin."""
    programs = set()
    for s in dockerfile.chain(stage):
        for copy in s.all("COPY"):
            destination = copy.flags_and_words()[1][-1]
            if destination.startswith("/usr/local/bin/"):
                programs.add(Path(destination).name)
    return programs


def filled(value: str) -> str:
    """``value`` with each ``${...}`` variable replaced by a placeholder, as compose would fill it."""
    return re.sub(r"\$\{[^}]+\}", "x", value)


def command_words(value) -> list[str]:
    return shlex.split(value) if isinstance(value, str) else list(value)


# ---- Dockerfiles ---------------------------------------------------------------------


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_copy_sources_exist_and_stay_in_the_build_context(path):
    dockerfile = parse_dockerfile(path)
    ignore = dockerignore_for(path)
    sources = []
    for stage in dockerfile.stages:
        for copy in stage.all("COPY") + stage.all("ADD"):
            flags, words = copy.flags_and_words()
            if "from" not in flags:
                sources += words[:-1]
        for run in stage.all("RUN"):
            sources += [m["source"] for m in run.mounts() if m.get("type") == "bind" and "from" not in m]
    assert sources, "the Dockerfile copies nothing from the project"
    for source in sources:
        assert (REPO / source).exists(), f"{path.name}: {source} is not in the project"
        assert dockerignore_includes(ignore, source), f"{ignore.name} leaves {source} out of the build context"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_runs_as_non_root_in_exec_form_with_a_health_check(path):
    dockerfile = parse_dockerfile(path)
    runnable = [s for s in dockerfile.stages if dockerfile.effective(s, "ENTRYPOINT")]
    assert dockerfile.final in runnable
    for stage in runnable:
        where = f"{path.name} stage {stage.name or 'final'}"
        user = dockerfile.effective(stage, "USER")
        assert user is not None, f"{where} runs as the base image's user"
        uid = user.args.split(":")[0]
        assert uid not in ("root", "0"), f"{where} runs as root"
        assert re.fullmatch(r"\d+|\$\{\w+\}", uid), f"{where}: USER {uid} is not numeric (runAsNonRoot cannot check it)"
        entrypoint = dockerfile.effective(stage, "ENTRYPOINT").exec_form()
        assert entrypoint, f"{where}: ENTRYPOINT is not exec form, so signals would not reach the program"
        cmd = dockerfile.effective(stage, "CMD")
        assert cmd is not None and cmd.exec_form() is not None, f"{where}: CMD is not exec form"
        health = dockerfile.effective(stage, "HEALTHCHECK")
        assert health is not None and health.exec_form(), f"{where} has no exec-form HEALTHCHECK"
        assert health.exec_form()[0] in installed_programs(dockerfile, stage), (
            f"{where}: health check program not installed"
        )


def test_agent_image_runs_the_agent_as_pid_1():
    dockerfile = parse_dockerfile(AGENT_DOCKERFILE)
    final = dockerfile.final
    program, *_ = dockerfile.effective(final, "ENTRYPOINT").exec_form()
    assert program in console_scripts(), f"{program} is not a console script of pyproject.toml"
    command = dockerfile.effective(final, "ENTRYPOINT").exec_form() + dockerfile.effective(final, "CMD").exec_form()
    assert command == ["flare-agent", "start", "--kit", "/kit"]
    assert dockerfile.effective(final, "STOPSIGNAL").args == "SIGTERM"
    assert dockerfile.effective(final, "VOLUME").exec_form() == ["/work"]
    # The kit's relative data_dir/work_dir ("data", "work") must land on the mounted folders.
    setup = " ".join(run.args for run in final_chain_runs(dockerfile))
    assert "ln -s /data /kit/data" in setup and "ln -s /work /kit/work" in setup


def final_chain_runs(dockerfile):
    return [run for stage in dockerfile.chain(dockerfile.final) for run in stage.all("RUN")]


def test_agent_image_keeps_the_base_images_cuda_pytorch():
    dockerfile = parse_dockerfile(AGENT_DOCKERFILE)
    image = dockerfile.image_of(dockerfile.final)
    match = re.fullmatch(r"pytorch/pytorch:(?P<torch>[\d.]+)-cuda[\d.]+-cudnn\d+-runtime", image)
    assert match, f"{image} is not an official CUDA runtime image of PyTorch"
    assert match["torch"] == constraint_pins()["torch"], "the image's PyTorch differs from the tested one"
    installs = [run.args for run in final_chain_runs(dockerfile) if "pip install" in run.args]
    assert any("[agent]" in run for run in installs), "the agent extra is not installed"
    for run in installs:
        words = shlex.split(run)
        assert not any(re.match(r"torch\b", w) for w in words), "the Dockerfile installs torch over the base image's"


def test_airflow_image_is_the_official_one_without_torch():
    dockerfile = parse_dockerfile(AIRFLOW_DOCKERFILE)
    image = dockerfile.image_of(dockerfile.final)
    match = re.fullmatch(r"apache/airflow:(?P<airflow>3[\d.]+)-python(?P<python>3\.\d+)", image)
    assert match, f"{image} is not an official Airflow 3 image"
    assert match["airflow"] == constraint_pins()["apache-airflow"], "the image's Airflow differs from the tested one"
    extras = pyproject()["project"]["optional-dependencies"]
    assert not any(re.match(r"torch\b", dep) for dep in extras["airflow"]), "the [airflow] extra brings torch"
    installs = [run for run in dockerfile.final.all("RUN") if "pip install" in run.args]
    assert installs and all("[airflow]" in run.args and "[agent]" not in run.args for run in installs)
    for run in installs:
        assert not any(re.match(r"torch\b", w) for w in shlex.split(run.args))
        checks = [m["source"] for m in run.mounts() if m.get("source", "").endswith(".py")]
        assert checks == ["docker/check_airflow_image.py"], "the build does not check the image for torch"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles_pass_hadolint(path):
    result = subprocess.run(
        [str(BIN / "hadolint"), "--no-color", "--failure-threshold", "style", str(path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ---- compose ----------------------------------------------------------------------------


def test_compose_builds_come_from_the_project(services):
    built = {name: s for name, s in services.items() if "build" in s}
    assert {dockerfile_of(s) for s in built.values()} == set(DOCKERFILES)
    for name, service in services.items():
        assert "image" in service, f"service {name} names no image"
        if name in built:
            build = service["build"]
            assert (DOCKER / build["context"]).resolve() == REPO, f"{name}: build context is not the project root"
            dockerfile = parse_dockerfile(dockerfile_of(service))
            if "target" in build:
                assert build["target"] in {s.name for s in dockerfile.stages}, f"{name}: no stage {build['target']}"


def test_compose_mounts_exist(compose, services):
    declared = set(compose.get("volumes") or {})
    used = set()
    for name, service in services.items():
        for spec in service.get("volumes", []):
            source, target, mode = split_volume(spec)
            assert target.startswith("/") and mode in ("ro", "rw"), f"{name}: odd volume {spec!r}"
            if source.startswith((".", "/")):
                assert (DOCKER / source).exists(), f"{name} mounts {source}, which is not in the project"
            else:
                assert source in declared, f"{name} uses volume {source}, which is not declared"
                used.add(source)
    assert declared == used, f"declared but unused volumes: {declared - used}"


def test_compose_networks_and_dependencies_hold(compose, services):
    networks = set(compose["networks"])
    for name, service in services.items():
        if service.get("network_mode") == "none":
            assert "networks" not in service and "ports" not in service, f"{name} is offline yet names networks"
        else:
            assert set(service.get("networks", ())) <= networks and service.get("networks"), f"{name}: networks"
        for dependency, spec in (service.get("depends_on") or {}).items():
            assert dependency in services, f"{name} depends on unknown service {dependency}"
            target = services[dependency]
            assert not set(target.get("profiles", ())) - set(service.get("profiles", ())), (
                f"{name} depends on {dependency}, which only runs in a profile"
            )
            condition = spec["condition"]
            if condition == "service_healthy":
                test = (target.get("healthcheck") or {}).get("test")
                assert test, f"{name} waits for {dependency} to be healthy, which has no health check"
            else:
                assert condition == "service_completed_successfully", f"{name}: condition {condition}"
                assert target.get("restart") == "no", f"{name} waits for {dependency} to finish, which restarts"


def test_compose_programs_exist(services):
    scripts = console_scripts()
    for name, service in services.items():
        entrypoint = service.get("entrypoint")
        if entrypoint is not None:
            words = command_words(entrypoint)
            if words[0] in ("bash", "/bin/bash", "/bin/sh") and len(words) > 1 and words[1] != "-c":
                mounted = {split_volume(v)[1]: split_volume(v)[0] for v in service.get("volumes", [])}
                assert words[1] in mounted, f"{name} runs {words[1]}, which is not mounted into it"
        if "build" not in service:
            continue  # third-party images: their own programs
        dockerfile, stage = image_stage(service)
        programs = installed_programs(dockerfile, stage) | scripts
        test = (service.get("healthcheck") or {}).get("test")
        if test:
            assert test[0] == "CMD" and test[1] in programs, f"{name}: health check {test} runs no installed program"


def test_compose_airflow_has_every_component(services):
    airflow = {name: s for name, s in services.items() if dockerfile_of(s) == AIRFLOW_DOCKERFILE}
    commands = {" ".join(command_words(s["command"])) for s in airflow.values() if "entrypoint" not in s}
    assert commands == AIRFLOW_COMMANDS
    init = [name for name, s in airflow.items() if "entrypoint" in s]
    assert init == ["airflow-init"]
    for name, service in airflow.items():
        if name != "airflow-init":
            assert service["depends_on"]["airflow-init"]["condition"] == "service_completed_successfully"


def test_compose_airflow_settings_are_real_and_consistent(services):
    options = airflow_options()
    apiserver = services["airflow-apiserver"]
    for name, service in services.items():
        if dockerfile_of(service) != AIRFLOW_DOCKERFILE:
            continue
        env = service["environment"]
        for key in env:
            if key.startswith("AIRFLOW__"):
                section, option = key[len("AIRFLOW__") :].lower().split("__", 1)
                assert option in options.get(section, ()), f"{name}: {key} is no Airflow setting"
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
        execution_api = urlparse(env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"])
        assert execution_api.hostname == "airflow-apiserver" and execution_api.path == "/execution/"
        assert any(p.endswith(f":{execution_api.port}") for p in apiserver["ports"])
        for url in (
            "AIRFLOW__CELERY__BROKER_URL",
            "AIRFLOW__CELERY__RESULT_BACKEND",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN",
        ):
            assert urlparse(filled(env[url])).hostname in services, f"{name}: {url} names no compose service"
        for secret in ("AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__CORE__FERNET_KEY", "AIRFLOW__API__SECRET_KEY"):
            assert re.fullmatch(r"\$\{\w+:\?[^}]+\}", env[secret]), f"{name}: {secret} must come from .env, required"
        assert env["FLARE_SNAPSHOT_URI"].startswith("s3://")
        aws = json.loads(filled(env["AIRFLOW_CONN_AWS_DEFAULT"]))
        assert aws["conn_type"] == "aws" and urlparse(aws["extra"]["endpoint_url"]).hostname in services


def test_compose_variables_are_documented(compose):
    text = COMPOSE_FILE.read_text()
    example = dict(
        line.split("=", 1) for line in EXAMPLE_ENV.read_text().splitlines() if line and not line.startswith("#")
    )
    for name, operator in compose_variables(text).items():
        if operator != ":-":
            assert name in example, f"{name} is used by compose.yaml without a default but not in example.env"
    secrets = [n for n, op in compose_variables(text).items() if op == ":?"]
    secret = re.compile(r"PASSWORD|SECRET|FERNET")
    assert secrets and all(example[n] == "" for n in secrets if secret.search(n)), "example.env must hold no secret"


# Services that call the sites' agents, through the relay: rounds, deferred rounds, the
# Federation page and `flare status`.
SITE_CALLERS = {"airflow-worker", "airflow-triggerer", "airflow-apiserver"}
HARDENED = {"read_only": True, "cap_drop": ["ALL"], "security_opt": ["no-new-privileges:true"]}


def network_members(services: dict[str, dict]) -> dict[str, set[str]]:
    members: dict[str, set[str]] = {}
    for name, service in services.items():
        for network in service.get("networks", ()):
            members.setdefault(network, set()).add(name)
    return members


def relay_services(services, compose_project) -> dict[str, dict]:
    """The relay service of each server participant, at the name the kits give its host."""
    return {server.relay_host: services[server.relay_host] for server in compose_project.servers}


def test_compose_sites_match_the_project(services, compose_project):
    provision = services["flare-provision"]
    provision_mounts = {split_volume(v)[1]: split_volume(v)[0] for v in provision["volumes"]}
    project_file = provision["environment"]["FLARE_PROJECT_FILE"]
    assert Path(DOCKER / provision_mounts[project_file]).resolve() == COMPOSE_PROJECT_FILE
    agents = set()
    for site in compose_project.clients:
        assert site.connect == "outbound", f"{site.name} does not dial out in docker/project.yml"
        agents.add(site.name)
        agent = services[site.name]
        assert dockerfile_of(agent) == AGENT_DOCKERFILE
        # Dialling out, the agent listens on no port: nothing to publish or expose.
        assert "ports" not in agent and "expose" not in agent, f"{site.name} offers a port"
        assert {k: agent.get(k) for k in HARDENED} == HARDENED, f"{site.name} is not locked down"
        mounts = {split_volume(v)[1]: split_volume(v) for v in agent["volumes"]}
        assert {target: mode for target, (_, _, mode) in mounts.items()} == KIT_MOUNTS
        for part in ("startup", "local"):
            assert provision_mounts[f"/kits/{site.name}/{part}"] == mounts[f"/kit/{part}"][0]
    assert agents == {"hospital-a", "hospital-b"}
    server_volume = provision_mounts[f"/kits/{compose_project.server.name}"]
    init = services["airflow-init"]
    (kit_target,) = [t for s, t, m in map(split_volume, init["volumes"]) if s == server_volume and m == "ro"]
    # The server kit is verified before Airflow imports its connection.
    assert f"flare_provider.cli kit import-connection --overwrite {kit_target}\n" in init["command"][0]


def test_compose_runs_each_servers_relay_from_its_kit(services, compose_project):
    from flare_provider.cli import build_parser

    provision = services["flare-provision"]
    provision_mounts = {split_volume(v)[1]: split_volume(v)[0] for v in provision["volumes"]}
    relays = relay_services(services, compose_project)
    assert list(relays) == ["airflow-server"]
    for server in compose_project.servers:
        name = server.relay_host
        relay = relays[name]
        assert name == server.name, "the relay's host must be a name in the server's certificate"
        command = command_words(relay["entrypoint"]) + command_words(relay["command"])
        assert command == ["flare", "relay", "start", "--kit", "/kit"]
        args = build_parser().parse_args(command[1:])
        assert args.func.__name__ == "cmd_relay_start"
        # The server's kit, as flare-provision publishes it, read-only; run as its owner.
        assert relay["volumes"] == [f"{provision_mounts[f'/kits/{server.name}']}:/kit:ro"]
        assert relay["user"] == provision["environment"]["FLARE_SERVER_KIT_OWNER"]
        assert relay["depends_on"]["flare-provision"]["condition"] == "service_completed_successfully"
        assert {k: relay.get(k) for k in HARDENED} == HARDENED, f"{name} is not locked down"
        assert "/tmp" in relay.get("tmpfs", ()), f"{name}: TLS needs a writable /tmp"
        # Reached on the compose networks at the server's fed_learn_port, published nowhere.
        assert relay["expose"] == [str(server.fed_learn_port)] and "ports" not in relay
        assert relay["healthcheck"]["test"] == ["CMD", "flare-relay-healthcheck"]
        assert relay["restart"] == "unless-stopped"
        assert "deploy" not in relay


def test_compose_networks_let_only_the_relay_reach_the_sites(compose, services, compose_project):
    sites = {site.name for site in compose_project.clients}
    relays = set(relay_services(services, compose_project))
    members = network_members(services)
    for name in sites:
        for network in services[name]["networks"]:
            # A site shares its networks with the relays only.
            others = members[network] - sites - relays
            assert not others, f"{name} shares {network} with {others}"
            assert compose["networks"][network].get("internal") is True, f"{network} lets {name} out"
    for relay in relays:
        assert any(sites <= members[n] for n in services[relay]["networks"]), f"{relay}: sites cannot attach"
        for caller in SITE_CALLERS:
            shared = set(services[caller]["networks"]) & set(services[relay]["networks"])
            assert shared, f"{caller} cannot reach the relay {relay}"
            assert not shared & {n for s in sites for n in services[s]["networks"]}, (
                f"{caller} shares a network with the sites"
            )
    # Nothing but the Airflow components that call sites joins the relays' networks.
    relay_networks = {n for relay in relays for n in services[relay]["networks"]}
    joined = {name for n in relay_networks for name in members[n]}
    assert joined == sites | relays | SITE_CALLERS


def test_gpu_overlay_reserves_gpus_for_sites_only(services, compose_project):
    overlay = load_yaml(GPU_COMPOSE_FILE)["services"]
    assert set(overlay) == {site.name for site in compose_project.clients}
    for name, service in overlay.items():
        assert dockerfile_of(services[name]) == AGENT_DOCKERFILE, f"{name} is no agent"
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]


# ---- deployment docs --------------------------------------------------------------------


DEPLOYMENT_DOC = REPO / "docs" / "deployment.md"


def test_deployment_doc_names_real_airflow_settings():
    options = airflow_options()
    text = DEPLOYMENT_DOC.read_text()
    named = re.findall(r"`\[(\w+)\] (\w+)", text)
    assert len(named) >= 5
    for section, option in named:
        assert option in options.get(section, ()), f"docs/deployment.md names [{section}] {option}, unknown to Airflow"
    for section, option in re.findall(r"AIRFLOW__(\w+?)__(\w+)", text):
        assert option.lower() in options.get(section.lower(), ()), f"AIRFLOW__{section}__{option} is no setting"
    for setting in ("task_instance_heartbeat_timeout", "task_instance_heartbeat_timeout_detection_interval"):
        assert f"[scheduler] {setting}" in text


def test_deployment_doc_commands_parse():
    """Every ``flare`` and ``flare-agent`` command the doc shows is one the CLIs accept."""
    from flare_provider.cli import build_parser as flare_parser
    from site_agent.cli import build_parser as agent_parser

    parsers = {"flare": flare_parser(), "flare-agent": agent_parser()}
    lines = [line.strip() for line in DEPLOYMENT_DOC.read_text().splitlines()]
    commands = [line for line in lines if line.split(" ", 1)[0] in parsers]
    assert len(commands) >= 4
    for line in commands:
        words = shlex.split(line.split(" #", 1)[0])
        try:
            parsers[words[0]].parse_args(words[1:])
        except SystemExit:
            pytest.fail(f"docs/deployment.md shows a command the CLI rejects: {line}")


def test_compose_hands_kits_and_data_to_the_images_users(services):
    """Kit and data owners in compose are the users the two images run as."""
    agent_uid = parse_dockerfile(AGENT_DOCKERFILE).global_args.get("FLARE_UID") or next(
        arg.args.split("=")[1]
        for arg in parse_dockerfile(AGENT_DOCKERFILE).stage("agent").all("ARG")
        if arg.args.startswith("FLARE_UID=")
    )
    airflow_user = parse_dockerfile(AIRFLOW_DOCKERFILE).effective(parse_dockerfile(AIRFLOW_DOCKERFILE).final, "USER")
    provision = services["flare-provision"]["environment"]
    assert provision["FLARE_AGENT_OWNER"] == f"{agent_uid}:{agent_uid}"
    assert provision["FLARE_SERVER_KIT_OWNER"] == airflow_user.args == services["airflow-init"]["user"]
    assert services["demo-data"]["command"][:2] == ["--owner", agent_uid]
    script = (DOCKER / "provision_kits.sh").read_text()  # the defaults, for running it elsewhere
    assert f"FLARE_AGENT_OWNER:-{agent_uid}:{agent_uid}" in script
    assert f"FLARE_SERVER_KIT_OWNER:-{airflow_user.args}" in script

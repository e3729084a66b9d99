# syntax=docker/dockerfile:1
# The site agent: what each site runs on its GPU machine.
#
#   docker build -f docker/agent.Dockerfile -t flare-agent:latest .
#
# The image also carries the `flare` command without Airflow: docker/compose.yaml runs its
# provisioning (flare provision) and the server's relay (flare relay start --kit /kit,
# checked by flare-relay-healthcheck) from it.
#
# Contract with the kit's startup/docker.sh and docker/compose.yaml:
#   /kit/startup, /kit/local  the site's kit, mounted read-only (startup/ is signed)
#   /data                     the site's data, mounted read-only
#   /work                     a writable volume: deployed apps, task state, results
# local/site.yaml names data_dir "data" and work_dir "work", relative to the kit folder;
# /kit/data and /kit/work point at /data and /work, so the kit works unchanged.
#
# The base image brings CUDA and the CUDA build of PyTorch; its torch is kept, never
# replaced by the CPU build from the package index.
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime

# ---- the project as a wheel (no source tree in the final image) ----------------
FROM ${BASE_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY flare_provider/ flare_provider/
COPY site_agent/ site_agent/
RUN PIP_ROOT_USER_ACTION=ignore pip wheel --no-deps --no-cache-dir --wheel-dir /wheels .

# ---- the agent -------------------------------------------------------------------
FROM ${BASE_IMAGE} AS agent
ARG FLARE_UID=10001
LABEL org.opencontainers.image.title="flare-agent" \
      org.opencontainers.image.description="Site agent of a federated learning project orchestrated by Apache Airflow" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    HOME=/tmp
# HOME is on /tmp: the root filesystem may be read-only, and docker.sh runs the agent as
# the kit owner's uid, which has no home in the image.

# Tested versions of the agent's dependencies, except torch: the base image's stays.
RUN --mount=type=bind,from=wheel,source=/wheels,target=/tmp/wheels \
    --mount=type=bind,source=constraints/test.txt,target=/tmp/constraints.txt \
    set -eux; \
    grep -v '^torch==' /tmp/constraints.txt > /tmp/agent-constraints.txt; \
    python -c "from importlib.metadata import version; print('torch==' + version('torch'))" >> /tmp/agent-constraints.txt; \
    wheel="$(find /tmp/wheels -name 'airflow_provider_flare-*.whl')"; \
    PIP_ROOT_USER_ACTION=ignore pip install --no-cache-dir -c /tmp/agent-constraints.txt "${wheel}[agent]"; \
    rm /tmp/agent-constraints.txt; \
    flare-agent --help > /dev/null

# A fixed non-root user; docker.sh runs the container as the kit's owner instead, so
# the kit's private key (mode 0600) stays readable without loosening it.
RUN set -eux; \
    groupadd --gid "${FLARE_UID}" flare; \
    useradd --uid "${FLARE_UID}" --gid flare --no-create-home --home-dir /tmp --shell /usr/sbin/nologin flare; \
    mkdir -p /kit/startup /kit/local /data /work; \
    ln -s /data /kit/data; \
    ln -s /work /kit/work; \
    chown flare:flare /data /work

COPY --chmod=0755 docker/agent_healthcheck.py /usr/local/bin/flare-agent-healthcheck
COPY --chmod=0755 docker/relay_healthcheck.py /usr/local/bin/flare-relay-healthcheck

USER ${FLARE_UID}:${FLARE_UID}
WORKDIR /work
VOLUME ["/work"]
# The default agent_port of project.yml; a site's agent.json may name another.
EXPOSE 8102
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["flare-agent-healthcheck"]
# The agent is PID 1 and handles SIGTERM itself: running tasks are recorded as stopped
# and picked up again by the server after a restart.
STOPSIGNAL SIGTERM
ENTRYPOINT ["flare-agent"]
CMD ["start", "--kit", "/kit"]

# ---- demo data (docker compose --profile demo): adds scikit-learn for its digits -----
FROM agent AS demo
ARG FLARE_UID=10001
USER 0:0
RUN --mount=type=bind,source=constraints/test.txt,target=/tmp/constraints.txt \
    PIP_ROOT_USER_ACTION=ignore pip install --no-cache-dir -c /tmp/constraints.txt scikit-learn
COPY --chmod=0755 docker/demo_data.py /usr/local/bin/flare-demo-data
USER ${FLARE_UID}:${FLARE_UID}
ENTRYPOINT ["flare-demo-data"]
CMD []

# ---- the default build target: the agent, without the demo additions ----------------
FROM agent AS production

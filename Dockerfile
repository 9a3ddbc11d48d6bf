# syntax=docker/dockerfile:1
# streamlearn service image.
#   GPU (default): docker build -t streamlearn .            torch from PyPI with its CUDA runtime
#   CPU only:      docker build -t streamlearn:cpu --build-arg TORCH_VARIANT=cpu .
# Both run on the same slim base: PyPI's CUDA torch wheels carry the CUDA libraries themselves,
# so a GPU host needs only the NVIDIA driver and container toolkit (docker run --gpus all).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VARIANT=cuda
ARG TORCH_VERSION=2.13.0
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/streamlearn
ENV PATH=/opt/streamlearn/bin:$PATH
# torch first, in its own layer: it is most of the image and changes least often.
RUN if [ "$TORCH_VARIANT" = "cpu" ]; then \
        pip install --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}"; \
    elif [ "$TORCH_VARIANT" = "cuda" ]; then \
        pip install "torch==${TORCH_VERSION}"; \
    else \
        echo "TORCH_VARIANT must be cpu or cuda, got '$TORCH_VARIANT'" >&2; exit 1; \
    fi
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
COPY learners ./learners
COPY drift ./drift
RUN pip install . && pip check

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="streamlearn" \
      org.opencontainers.image.description="Online learning service: learns from Kafka event streams while it serves" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 streamlearn \
    && useradd --system --uid 10001 --gid streamlearn --home-dir /var/lib/streamlearn --shell /usr/sbin/nologin streamlearn \
    && mkdir -p /var/lib/streamlearn \
    && chown streamlearn:streamlearn /var/lib/streamlearn
COPY --from=build /opt/streamlearn /opt/streamlearn
ENV PATH=/opt/streamlearn/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    STREAMLEARN_HTTP_HOST=0.0.0.0 \
    STREAMLEARN_HTTP_PORT=8000 \
    STREAMLEARN_STATE_DIR=/var/lib/streamlearn
# Checkpoints (weights, encoder, monitors, offsets) live here: mount a volume to survive restarts.
VOLUME ["/var/lib/streamlearn"]
WORKDIR /var/lib/streamlearn
USER 10001:10001
EXPOSE 8000
# SIGTERM makes the service finish its batch, checkpoint, commit offsets and exit 0; give it time
# (docker stop -t 60, compose stop_grace_period, k8s terminationGracePeriodSeconds).
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('STREAMLEARN_HTTP_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["streamlearn"]
CMD ["serve"]

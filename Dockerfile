# syntax=docker/dockerfile:1
# Small CPU image by default. Variants (see README "Deploy"):
#   CUDA:     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128  (run with --gpus all)
#   offline:  put wheels in ./wheels and --build-arg OFFLINE=1: the wheels requirements.lock names (on Linux
#             x86_64 with Python 3.11: `pip download -d wheels --only-binary :all: --require-hashes -r requirements.lock`)
#             and torch's (`pip download -d wheels --no-deps --index-url https://download.pytorch.org/whl/cpu torch==2.13.0`)
#   local base image stand-in: --build-arg BASE_IMAGE=local/python:3.11-slim
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG OFFLINE=0
WORKDIR /src
COPY pyproject.toml requirements.lock ./
COPY wheels/ /wheels/
# Everything but torch comes from requirements.lock (`make lock`): exact versions, checked against their hashes.
# Then torch, the version pyproject.toml pins, from TORCH_INDEX_URL (OFFLINE: from /wheels): the lock already
# holds its dependencies, so the CPU build adds nothing else; a CUDA index adds its build's nvidia-* packages.
RUN python -m venv /opt/venv \
 && torch="torch==$(sed -n 's/.*"torch==\([0-9.]*\)".*/\1/p' pyproject.toml)" \
 && if [ "$OFFLINE" = "1" ]; then \
        /opt/venv/bin/pip install --no-cache-dir --no-index --find-links /wheels --require-hashes -r requirements.lock \
     && /opt/venv/bin/pip install --no-cache-dir --no-index --find-links /wheels "$torch"; \
    else \
        /opt/venv/bin/pip install --no-cache-dir --require-hashes -r requirements.lock \
     && /opt/venv/bin/pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" "$torch"; \
    fi \
 && /opt/venv/bin/pip check \
 && rm -rf /opt/venv/lib/python3.11/site-packages/torch/include /opt/venv/lib/python3.11/site-packages/torch/share \
 && find /opt/venv -depth -name __pycache__ -type d -exec rm -rf {} +   # headers and caches: not needed to serve

FROM ${BASE_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    SERVE_HOST=0.0.0.0 SERVE_PORT=8000 SERVE_GRPC_PORT=8001 SERVE_ARTIFACTS_DIR=/app/artifacts SERVE_LOG_JSON=true
# useradd where the base has it; minimal bases (the Debian minbase stand-in) get the entries written directly
RUN (groupadd --system --gid 10001 app && useradd --system --uid 10001 --gid app --no-create-home app) 2>/dev/null \
 || (echo "app:x:10001:" >> /etc/group && echo "app:x:10001:10001::/app:/usr/sbin/nologin" >> /etc/passwd)
WORKDIR /app
COPY --from=build /opt/venv /opt/venv
COPY service/ service/
COPY artifacts/ artifacts/
USER app
EXPOSE 8000 8001
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
  CMD python -c "import os, urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ[\"SERVE_PORT\"]}/healthz', timeout=2)"
STOPSIGNAL SIGTERM
CMD ["python", "-m", "service"]

# syntax=docker/dockerfile:1
# Small CPU image by default. Variants (see README "Deploy"):
#   CUDA:     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128  (run with --gpus all)
#   offline:  put wheels in ./wheels (pip download) and --build-arg OFFLINE=1
#   local base image stand-in: --build-arg BASE_IMAGE=local/python:3.11-slim
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG OFFLINE=0
WORKDIR /src
COPY pyproject.toml ./
COPY wheels/ /wheels/
# The runtime dependencies come from pyproject.toml, the one list of them.
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > requirements.txt \
 && python -m venv /opt/venv \
 && if [ "$OFFLINE" = "1" ]; then \
        /opt/venv/bin/pip install --no-cache-dir --no-index --find-links /wheels -r requirements.txt; \
    else \
        /opt/venv/bin/pip install --no-cache-dir --extra-index-url "$TORCH_INDEX_URL" -r requirements.txt; \
    fi \
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

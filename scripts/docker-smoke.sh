#!/usr/bin/env bash
# Build the image from a local wheelhouse, run it, wait for health, call every model route (the upload and
# the stream too), check the answers and the non-root user, report the image size, stop it. Not part of CI (needs a Docker engine).
# On a machine with no container registry: ../shared/tools/docker-local-base.sh first, then
#   BASE_IMAGE=local/python:3.11-slim scripts/docker-smoke.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BASE_IMAGE="${BASE_IMAGE:-python:3.11-slim}"
TAG="${TAG:-course-models:smoke}"
PORT="${PORT:-18000}"
PY="${PYTHON:-python3.11}"

echo "== wheelhouse (containers here cannot reach PyPI)"
"$PY" -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml','rb'))['project']['dependencies']))" > /tmp/smoke-req.txt
"$PY" -m pip download -q -d wheels -r /tmp/smoke-req.txt --only-binary=:all: --python-version 3.11 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform any

echo "== build"
docker build -q --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg OFFLINE=1 -t "$TAG" .
docker image inspect "$TAG" --format 'image size: {{.Size}} bytes' | awk '{printf "image size: %.0f MB\n", $3/1e6}'

echo "== run"
cid=$(docker run -d --rm -p "127.0.0.1:$PORT:8000" "$TAG")
trap 'docker stop -t 40 "$cid" >/dev/null 2>&1 || true' EXIT
for _ in $(seq 120); do
  [ "$(docker inspect -f '{{.State.Health.Status}}' "$cid")" = healthy ] && break; sleep 1
done
[ "$(docker inspect -f '{{.State.Health.Status}}' "$cid")" = healthy ] || { docker logs "$cid"; exit 1; }
[ "$(docker exec "$cid" id -u)" != 0 ] || { echo "container runs as root"; exit 1; }
echo "non-root user: $(docker exec "$cid" id -un)"

echo "== routes"
BASE="http://127.0.0.1:$PORT" "$PY" - <<'PY'
import json, os, urllib.error, urllib.request
base = os.environ["BASE"]
def call(path, body=None):
    req = urllib.request.Request(base + path, data=None if body is None else json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
status, ready = call("/readyz"); assert status == 200, ready
models = {m["name"]: m for m in call("/models")[1]}
for name, info in models.items():
    example = info["input_schema"].get("examples", [None])[0]
    if example is None:
        continue
    status, out = call(f"/{name}", example)
    assert status == 200, (name, out)
    print(f"{name}: {json.dumps(out, ensure_ascii=False)[:120]}")
status, out = call("/phone-price/batch", {"instances": [models["phone-price"]["input_schema"]["examples"][0]] * 3})
assert len(out["predictions"]) == 3
print("all routes answered")
PY

echo "== an upload and a stream, as the README sends them"
curl -sf -F file=@examples/trousers.png "http://127.0.0.1:$PORT/fashion/image?top_k=2" | tee /dev/stderr | grep -q '"name":"Trouser"'
curl -sfN -X POST "http://127.0.0.1:$PORT/poem/stream" -H 'content-type: application/json' -d '{"line_num": 1}' \
  | tee /dev/stderr | grep -q '^event: poem'
echo
echo "smoke: every route answered"

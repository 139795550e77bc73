"""The Kubernetes manifests and docker-compose file agree with the service's real settings and routes."""

import re
from pathlib import Path

import yaml

from service.app import create_app
from service.runtime.metrics import Metrics
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"


def _docs() -> dict[str, dict]:
    docs = [d for p in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]
    return {d["kind"]: d for d in docs}


def _setting_names() -> set[str]:
    prefix = Settings.model_config["env_prefix"]
    return {f"{prefix}{name}".upper() for name in Settings.model_fields}


def test_kubernetes_manifests_match_the_service():
    docs = _docs()
    deployment, service, hpa = docs["Deployment"], docs["Service"], docs["HorizontalPodAutoscaler"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert set(env) <= _setting_names(), f"unknown settings: {set(env) - _setting_names()}"
    for name, value in env.items():  # every value parses as the setting it names
        if value is not None:
            Settings(**{name.removeprefix("SERVE_").lower(): value})
    port, grpc = container["ports"]
    assert int(env["SERVE_PORT"]) == port["containerPort"] and int(env["SERVE_GRPC_PORT"]) == grpc["containerPort"]
    paths = create_app().openapi()["paths"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz" in paths
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz" in paths
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["port"] == port["name"]
    assert service["spec"]["ports"][0]["targetPort"] == port["name"]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"]
    # the pod must outlive the server's graceful drain (python -m service uses 30 s)
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > 30


def test_the_keda_triggers_query_metrics_the_service_exports():
    (scaled,) = yaml.safe_load_all((K8S / "keda" / "scaledobject.yaml").read_text())
    assert scaled["spec"]["scaleTargetRef"]["name"] == _docs()["Deployment"]["metadata"]["name"]
    exported = set()
    for family in Metrics().registry.collect():  # names as Prometheus sees them, suffixes included
        exported |= {family.name, *(family.name + suffix for suffix in ("_total", "_bucket", "_sum", "_count"))}
    queries = [t["metadata"]["query"] for t in scaled["spec"]["triggers"] if t["type"] == "prometheus"]
    used = {name for query in queries for name in re.findall(r"\b([a-z_]+)\{", query)}
    assert used and used <= exported, f"not exported by /metrics: {used - exported}"


def test_kserve_manifests_match_the_service():
    (runtime,) = yaml.safe_load_all((ROOT / "deploy" / "kserve" / "servingruntime.yaml").read_text())
    (service,) = yaml.safe_load_all((ROOT / "deploy" / "kserve" / "inferenceservice.yaml").read_text())
    assert runtime["kind"] == "ServingRuntime" and "v2" in runtime["spec"]["protocolVersions"]
    (container,) = runtime["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert set(env) <= _setting_names(), f"unknown settings: {set(env) - _setting_names()}"
    for name, value in env.items():
        Settings(**{name.removeprefix("SERVE_").lower(): value})
    (port,) = container["ports"]
    assert port["containerPort"] == int(env["SERVE_PORT"])
    paths = create_app().openapi()["paths"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert (
            container[probe]["httpGet"]["path"] in paths
            and container[probe]["httpGet"]["port"] == port["containerPort"]
        )
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"] and model["protocolVersion"] == "v2"
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}


def test_compose_file_matches_the_service():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    (server,) = compose["services"].values()
    env = server["environment"]
    assert set(env) <= _setting_names()
    assert server["ports"] == [f"8000:{env['SERVE_PORT']}", f"8001:{env['SERVE_GRPC_PORT']}"]
    assert "/healthz" in " ".join(server["healthcheck"]["test"])

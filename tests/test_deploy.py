"""Deployment files agree with the code. No Docker engine runs here, so the files are checked as data."""
from __future__ import annotations

import re
from pathlib import Path

import yaml

from hypergen.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def settings_env_names() -> set[str]:
    return {f"HYPERGEN_{name.upper()}" for name in Settings.model_fields}


def test_openapi_yaml_is_generated_from_the_app():
    from server.openapi import openapi_yaml

    assert (ROOT / "openapi.yaml").read_text() == openapi_yaml(), "run: .venv/bin/python -m server.openapi > openapi.yaml"


def test_openapi_documents_every_route():
    spec = yaml.safe_load((ROOT / "openapi.yaml").read_text())
    for path in ["/adapters", "/adapters/{adapter_id}", "/adapters/{adapter_id}/weights", "/generate",
                 "/v1/completions", "/v1/chat/completions", "/v1/models", "/healthz", "/readyz", "/metrics"]:
        assert path in spec["paths"], path


def test_compose_services_and_env_match_the_settings():
    compose = yaml.safe_load((ROOT / "docker" / "docker-compose.yml").read_text())
    redis, server = compose["services"]["redis"], compose["services"]["server"]
    assert redis["healthcheck"]["test"][-1] == "ping"
    assert "--maxmemory-policy" in redis["command"] and "allkeys-lru" in redis["command"]
    assert server["depends_on"]["redis"]["condition"] == "service_healthy"
    env = {k: v for k, v in server["environment"].items() if k.startswith("HYPERGEN_")}
    unknown = set(env) - settings_env_names()
    assert not unknown, f"compose sets variables Settings does not read: {unknown}"
    assert set(server["environment"]) - set(env) <= {"VLLM_NO_USAGE_STATS", "DO_NOT_TRACK"}
    Settings(**{k.removeprefix("HYPERGEN_").lower(): v for k, v in env.items() if "${" not in str(v)})
    assert env["HYPERGEN_DEVICE"] == "cuda" and float(env["HYPERGEN_GPU_MEMORY_UTILIZATION"]) <= 0.6
    assert server["shm_size"] and any(v.endswith(":/root/.cache/vllm") for v in server["volumes"])
    assert env["HYPERGEN_REDIS_URL"].startswith("redis://redis:")
    assert any(t.startswith(env["HYPERGEN_ADAPTER_DIR"] + ":") for t in server["tmpfs"])
    assert any(v.endswith(":" + env["HYPERGEN_HOME"]) for v in server["volumes"])
    device = server["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert server["build"]["dockerfile"] == "docker/Dockerfile"


def test_the_gpu_extra_pins_the_vllm_of_the_gpu_image():
    import tomllib

    base = re.search(r"^FROM vllm/vllm-openai:v(\S+)", (ROOT / "docker" / "Dockerfile").read_text(), re.M).group(1)
    gpu = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    assert gpu == [f"vllm=={base}"]  # one tested vLLM on both install paths


def test_dockerfiles_pin_their_base_and_start_the_server():
    for name in ("Dockerfile", "Dockerfile.cpu"):
        text = (ROOT / "docker" / name).read_text()
        base = re.search(r"^FROM (\S+)", text, re.M).group(1)
        assert ":" in base and not base.endswith(":latest"), base
        assert 'ENTRYPOINT ["hypergen", "serve"]' in text
        for var in re.findall(r"\b(HYPERGEN_[A-Z_]+)=", text):
            assert var in settings_env_names(), var
        assert (ROOT / "docker" / f"{name}.dockerignore").read_text().startswith(".venv")
    assert "docker/install.sh --cpu" in (ROOT / "docker" / "Dockerfile.cpu").read_text()


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = re.search(r"^(bash docker/install.sh --dev && \S+ -m pytest.*)$", readme, re.M).group(1)
    assert command in ci

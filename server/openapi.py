"""The OpenAPI document, exact enough for a contract fuzzer: ``python -m server.openapi > openapi.yaml``.

FastAPI derives most of it from the schemas; what depends on settings (the max_tokens bound,
the base model's name) or is not a field (optional authentication) is filled in here.
"""
from __future__ import annotations

import sys
from typing import Any

import yaml
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from hypergen.settings import Settings
from hypergen.task import TASK_HASH_PATTERN

TOKEN_FIELDS = ("max_tokens", "max_completion_tokens")
OPENAI_REQUESTS = ("CompletionRequest", "ChatCompletionRequest")  # their `model` names the adapter


def _bound_tokens(prop: dict[str, Any], limit: int) -> None:
    for option in [prop, *prop.get("anyOf", [])]:
        if option.get("type") == "integer":
            option["maximum"] = limit
    if isinstance(prop.get("default"), int):
        prop["default"] = min(prop["default"], limit)


def openapi_document(app: FastAPI, settings: Settings, base_name: str) -> dict[str, Any]:
    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    for name, schema in doc.get("components", {}).get("schemas", {}).items():
        props = schema.get("properties", {})
        for field in TOKEN_FIELDS:
            if field in props:
                _bound_tokens(props[field], settings.max_tokens_limit)
        if name in OPENAI_REQUESTS:
            props["model"] = {
                "type": "string",
                "anyOf": [{"const": base_name}, {"pattern": TASK_HASH_PATTERN}],
                "description": "The base model's name, or an adapter id.",
            }
    for path in doc.get("paths", {}).values():
        for operation in path.values():
            if "security" in operation:  # keys are checked only when HYPERGEN_API_KEYS is set
                operation["security"] = [*operation["security"], {}]
    return doc


def install_openapi(app: FastAPI, settings: Settings) -> None:
    """Serves the exact document at /openapi.json (base name from the loaded checkpoint once known)."""

    built: dict[str, dict[str, Any]] = {}  # base name -> document

    def openapi() -> dict[str, Any]:
        state = getattr(app.state, "hypergen", None)
        base_name = state.base_name if state is not None else settings.base_model
        if base_name not in built:
            built[base_name] = openapi_document(app, settings, base_name)
        return built[base_name]

    app.openapi = openapi


def openapi_yaml() -> str:
    from server.app import create_app

    return yaml.safe_dump(create_app(Settings()).openapi(), sort_keys=False, allow_unicode=True)


if __name__ == "__main__":
    sys.stdout.write(openapi_yaml())

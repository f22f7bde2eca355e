"""Writes the app's OpenAPI document as YAML: ``python -m server.openapi > openapi.yaml``."""
from __future__ import annotations

import sys

import yaml

from hypergen.settings import Settings


def openapi_yaml() -> str:
    from server.app import create_app

    return yaml.safe_dump(create_app(Settings()).openapi(), sort_keys=False, allow_unicode=True)


if __name__ == "__main__":
    sys.stdout.write(openapi_yaml())

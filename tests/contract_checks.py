"""A schemathesis check for tests/test_contract.py (loaded through SCHEMATHESIS_HOOKS).

A schema-valid request may still meet a limit counted in tokens, which JSON Schema cannot
express; the contract is that such requests answer 413 with one of these codes, and that
413 means nothing else.
"""
from __future__ import annotations

import schemathesis

TOKEN_LIMITS = {"prompt_too_long", "context_too_long", "body_too_large"}


@schemathesis.check
def size_limits_only(ctx, response, case):  # noqa: ANN001 (schemathesis' check signature)
    if response.status_code == 413:
        code = response.json()["error"]["code"]
        if code not in TOKEN_LIMITS:
            raise AssertionError(f"413 with code {code!r}; only {sorted(TOKEN_LIMITS)} are size limits")
    return None

"""Tenants: with API keys set, each key is a tenant that owns the adapters and jobs it makes.

- **Who**: a tenant is named by the first 16 hex characters of its key's SHA-256. Keys may be
  configured as ``sha256:<hex>``, so plain keys need not sit in the environment; an offered key
  is hashed and compared with every configured hash, each in constant time.
- **What it owns**: an adapter's metadata carries ``owner`` and ``public`` in every cache tier,
  so every replica enforces them. Another tenant's private adapter reads as unknown: the same
  404, code and message as an id that never existed, for every route.
- **No shared records**: a tenant's adapter ids are scoped (a hash of the tenant and the task
  hash), so two tenants sending one task get two records and two hypernetwork runs. One shared
  record would answer the second tenant ``cached: true`` (or simply faster), telling it that
  someone else sent that task. A public adapter keeps the plain task hash: anyone may read it,
  only its owner may delete it.
- **Quotas** (unset: none): requests per minute per tenant, and adapters held per tenant; past
  either, 429 with Retry-After. Counted in Redis when configured (fleet-wide), else per replica.

With no keys configured there are no tenants: ids are plain task hashes and all is shared.
"""
from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import dataclass, field

from hypergen.settings import Settings
from server.cache import RedisCache
from server.errors import ApiError
from server.schemas import AdapterMeta

TENANT_CHARS = 16
HASHED_PREFIX = "sha256:"
WINDOW_S = 60


def key_digest(key: str) -> str:
    """A configured key's SHA-256 (hex): given as ``sha256:<hex>``, or hashed here from the plain key."""
    if key.startswith(HASHED_PREFIX):
        return key[len(HASHED_PREFIX):].strip().lower()
    return hashlib.sha256(key.encode()).hexdigest()


def scoped_id(adapter_id: str, tenant: str | None, public: bool = False) -> str:
    """The id a tenant's own copy of an adapter has (the plain id without tenants, or when public)."""
    if tenant is None or public:
        return adapter_id
    return hashlib.sha256(f"tenant:{tenant}:{adapter_id}".encode()).hexdigest()


def can_read(meta: AdapterMeta, tenant: str | None) -> bool:
    return tenant is None or meta.public or meta.owner == tenant


def can_delete(meta: AdapterMeta, tenant: str | None) -> bool:
    return tenant is None or meta.owner == tenant


@dataclass
class Tenants:
    settings: Settings
    redis: RedisCache | None
    _digests: list[str] = field(init=False)
    _windows: dict[str, tuple[int, int]] = field(default_factory=dict, init=False)  # tenant -> (window, count)
    _owned: dict[str, set[str]] = field(default_factory=dict, init=False)  # without Redis

    def __post_init__(self) -> None:
        self._digests = [key_digest(k) for k in self.settings.api_keys]

    def identify(self, offered: str | None) -> str | None:
        """The tenant an offered bearer key belongs to; None when no keys are configured; else 401."""
        if not self._digests:
            return None
        digest = hashlib.sha256((offered or "").encode()).hexdigest()
        # Every configured key compared, each in constant time: timing says nothing about them.
        matches = [hmac.compare_digest(digest, known) for known in self._digests]
        if offered is None or not any(matches):
            raise ApiError(401, "unauthorized", "a valid 'Authorization: Bearer <key>' header is required", None,
                           {"WWW-Authenticate": "Bearer"})
        return digest[:TENANT_CHARS]

    async def admit(self, tenant: str | None) -> None:
        """Counts a request against the tenant's per-minute quota; 429 past it."""
        limit = self.settings.tenant_requests_per_minute
        if tenant is None or limit is None:
            return
        now = time.time()
        window = int(now // WINDOW_S)
        count = await self.redis.count("rate", f"{tenant}:{window}", WINDOW_S) if self.redis is not None else None
        if count is None:  # no Redis, or it failed: this replica's own count
            seen_window, seen = self._windows.get(tenant, (window, 0))
            count = (seen if seen_window == window else 0) + 1
            self._windows[tenant] = (window, count)
        if count > limit:
            retry = max(1, int((window + 1) * WINDOW_S - now) + 1)
            raise ApiError(429, "rate_limited", f"more than {limit} requests this minute for this key", None,
                           {"Retry-After": str(retry)})

    async def check_room(self, tenant: str | None) -> None:
        """429 when the tenant already holds its quota of adapters (ones that expired do not count)."""
        limit = self.settings.tenant_max_adapters
        if tenant is None or limit is None:
            return
        owned = await self._owned_ids(tenant)
        if len(owned) >= limit:
            raise ApiError(429, "adapter_quota", f"this key holds {len(owned)} adapters, the most allowed; delete some first",
                           None, {"Retry-After": str(WINDOW_S)})

    async def owns(self, tenant: str | None, adapter_id: str) -> None:
        if tenant is None:
            return
        self._owned.setdefault(tenant, set()).add(adapter_id)  # this replica's view, used while Redis is away
        if self.redis is not None:
            await self.redis.add_member("owned", tenant, adapter_id)

    async def disowns(self, tenant: str | None, adapter_id: str) -> None:
        if tenant is None:
            return
        self._owned.get(tenant, set()).discard(adapter_id)
        if self.redis is not None:
            await self.redis.remove_member("owned", tenant, adapter_id)

    async def _owned_ids(self, tenant: str) -> set[str]:
        stored = await self.redis.members("owned", tenant) if self.redis is not None else None
        if stored is None:  # no Redis, or it failed: this replica's view
            return set(self._owned.get(tenant, set()))
        owned = set()
        for adapter_id in stored:
            if await self.redis.exists(adapter_id):
                owned.add(adapter_id)
            else:  # expired from the cache: no longer held
                await self.redis.remove_member("owned", tenant, adapter_id)
        return owned

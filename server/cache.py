"""Adapter cache tiers: an in-process LRU bounded in bytes, then Redis (optional, may be down).

Entries are ``Adapter.to_bytes()`` blobs plus a small JSON metadata record. Every
read is verified by the blob's own checksum by the caller (``Adapter.from_bytes``);
a tier that returns a damaged entry is told to drop it.

Redis is treated as a helper, never a dependency: every call has a short timeout,
a failure marks the tier unavailable for a back-off period (so requests do not
each wait on a dead server), and the next call after it tries again.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, AsyncIterator

log = logging.getLogger(__name__)


@dataclass
class CacheEntry:
    blob: bytes
    meta: dict[str, Any]


class MemoryCache:
    """LRU over adapter ids, evicting least-recently-used entries past ``max_bytes``."""

    name = "memory"

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, CacheEntry] = OrderedDict()
        self._bytes = 0

    def get(self, key: str) -> CacheEntry | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, key: str, entry: CacheEntry) -> None:
        self.delete(key)
        if len(entry.blob) > self.max_bytes:
            return
        self._entries[key] = entry
        self._bytes += len(entry.blob)
        while self._bytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self._bytes -= len(old.blob)

    def delete(self, key: str) -> bool:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= len(entry.blob)
        return entry is not None

    def keys(self) -> list[str]:
        return list(self._entries)


class RedisCache:
    """Adapters in Redis with a TTL: ``{prefix}adapter:{id}`` holds the metadata (JSON) and
    ``{prefix}blob:{id}`` the blob, written together in one transaction.

    Why two strings and not one hash: Redis copies a hash field's value on HSET, and a 1.9 MB
    blob took 1.2-6.4 ms of Redis's (single) thread a miss; SET keeps the bytes it read (15 us).
    Entries in the older hash layout read as misses and are overwritten when regenerated.
    """

    name = "redis"

    def __init__(self, url: str, prefix: str, ttl_s: int, timeout_s: float = 0.5, backoff_s: float = 1.0) -> None:
        import redis.asyncio as redis

        self.url = url
        self.prefix = prefix
        self.ttl_s = ttl_s
        self.backoff_s = backoff_s
        self._client = redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, health_check_interval=5
        )
        self._down_until = 0.0
        self.last_error: str | None = None

    def _key(self, kind: str, key: str) -> str:
        return f"{self.prefix}{kind}:{key}"

    @property
    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    async def _call(self, op: str, coro_factory, default=None):
        """Runs one Redis operation; on failure marks Redis down for a while and returns default."""
        if not self.available:
            return default
        try:
            result = await coro_factory()
        except Exception as exc:  # redis errors, timeouts, closed connections: all mean "degraded"
            if self.last_error is None:
                log.warning("redis unavailable (%s: %s); serving from in-process tiers", op, exc)
            self.last_error = f"{type(exc).__name__}: {exc}"
            self._down_until = time.monotonic() + self.backoff_s
            return default
        if self.last_error is not None:
            log.info("redis is back")
        self.last_error = None
        return result

    async def ping(self) -> bool:
        self._down_until = 0.0  # an explicit probe always tries
        return bool(await self._call("ping", self._client.ping, False))

    async def get(self, key: str) -> CacheEntry | None:
        values = await self._call("get", lambda: self._client.mget(self._key("adapter", key), self._key("blob", key)), None)
        if not values or values[0] is None or values[1] is None:  # gone, half expired, or an older layout's hash
            return None
        try:
            meta = json.loads(values[0])
        except ValueError:
            meta = {}
        return CacheEntry(values[1], meta)

    async def put(self, key: str, entry: CacheEntry) -> bool:
        async def write():
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.set(self._key("blob", key), entry.blob, ex=self.ttl_s)
                pipe.set(self._key("adapter", key), json.dumps(entry.meta), ex=self.ttl_s)
                await pipe.execute()
            return True

        return bool(await self._call("put", write, False))

    async def delete(self, key: str) -> bool:
        return bool(await self._call("delete", lambda: self._client.delete(self._key("adapter", key), self._key("blob", key)), 0))

    async def put_record(self, kind: str, key: str, value: str) -> bool:
        """A small JSON record (e.g. a job's state) under ``{prefix}{kind}:{key}``, with the TTL."""
        return bool(await self._call("put", lambda: self._client.set(self._key(kind, key), value, ex=self.ttl_s), False))

    async def get_record(self, kind: str, key: str) -> str | None:
        value = await self._call("get", lambda: self._client.get(self._key(kind, key)), None)
        return value.decode() if isinstance(value, bytes) else value

    async def metas(self, limit: int) -> dict[str, dict] | None:
        """Up to ``limit`` adapters in Redis (any replica's) and their metadata; None when Redis fails."""
        async def scan():
            pattern, found = self._key("adapter", "*"), {}
            async for raw in self._client.scan_iter(match=pattern, count=500):
                key = raw.decode() if isinstance(raw, bytes) else raw
                found[key] = None
                if len(found) >= limit:
                    break
            keys = list(found)
            values = await self._client.mget(keys) if keys else []
            out = {}
            for key, value in zip(keys, values):
                try:
                    out[key.removeprefix(self._key("adapter", ""))] = json.loads(value) if value else {}
                except ValueError:
                    continue
            return out

        return await self._call("scan", scan, None)

    async def count(self, kind: str, key: str, ttl_s: int) -> int | None:
        """Adds one to a counter that expires ``ttl_s`` after its first use; None when Redis fails."""
        async def bump():
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.incr(self._key(kind, key))
                pipe.expire(self._key(kind, key), ttl_s, nx=True)
                return (await pipe.execute())[0]

        return await self._call("count", bump, None)

    async def add_member(self, kind: str, key: str, member: str) -> bool:
        return bool(await self._call("sadd", lambda: self._client.sadd(self._key(kind, key), member), 0))

    async def remove_member(self, kind: str, key: str, member: str) -> bool:
        return bool(await self._call("srem", lambda: self._client.srem(self._key(kind, key), member), 0))

    async def members(self, kind: str, key: str) -> set[str] | None:
        """The set's members; None when Redis fails."""
        found = await self._call("smembers", lambda: self._client.smembers(self._key(kind, key)), None)
        return None if found is None else {m.decode() if isinstance(m, bytes) else m for m in found}

    async def exists(self, key: str) -> bool:
        return bool(await self._call("exists", lambda: self._client.exists(self._key("adapter", key)), 0))

    async def acquire_lock(self, key: str, ttl_ms: int) -> str | None:
        """A short cross-replica lock so only one replica runs the hypernetwork for a task."""
        token = uuid.uuid4().hex
        ok = await self._call(
            "lock", lambda: self._client.set(self._key("lock", key), token, nx=True, px=ttl_ms), None
        )
        return token if ok else None

    async def renew_lock(self, key: str, token: str, ttl_ms: int) -> bool:
        """Extends our own lock (False when it is no longer ours, or Redis failed)."""
        script = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
        return bool(await self._call("renew", lambda: self._client.eval(script, 1, self._key("lock", key), token, ttl_ms), 0))

    async def publish_delete(self, key: str) -> bool:
        """Tells every replica that an adapter is gone (False when Redis could not be reached)."""
        return await self._call("publish", lambda: self._client.publish(self._key("events", "deleted"), key), None) is not None

    async def deleted_ids(self) -> AsyncIterator[str | None]:
        """Adapter ids deleted anywhere in the fleet, as they are announced. Yields None each time
        the subscription is (re)made: deletes announced while it was down were missed."""
        while True:
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._key("events", "deleted"))
                yield None
                while True:
                    message = await pubsub.get_message(timeout=0.25)  # below the socket timeout
                    if message is not None and message.get("type") == "message":
                        data = message["data"]
                        yield data.decode() if isinstance(data, bytes) else data
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis went away: subscribe again once it is back
                log.warning("delete announcements interrupted (%s); resubscribing", exc)
                await asyncio.sleep(self.backoff_s)
            finally:
                try:
                    await pubsub.aclose()
                except Exception:
                    pass

    async def release_lock(self, key: str, token: str) -> None:
        script = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
        await self._call("unlock", lambda: self._client.eval(script, 1, self._key("lock", key), token), 0)

    async def wait_for(self, key: str, timeout_s: float, poll_s: float = 0.05) -> CacheEntry | None:
        """Polls for an entry that another replica is producing, while its lock is held.

        Returns None (the caller computes it itself) as soon as the lock is gone without an
        entry (that replica's write failed, or it gave up), when Redis fails, or at the timeout
        (the lock's TTL: a replica that died mid-run).
        """
        deadline = time.monotonic() + timeout_s  # a cap; a live holder renews its lock meanwhile
        while time.monotonic() < deadline and self.available:
            entry = await self.get(key)
            if entry is not None:
                return entry
            if not await self._call("exists", lambda: self._client.exists(self._key("lock", key)), 0):
                return await self.get(key)  # released: written just now, or never will be
            await asyncio.sleep(poll_s)
        return None

    async def close(self) -> None:
        try:
            await self._client.aclose()
        except Exception:  # closing a broken connection must not fail shutdown
            pass

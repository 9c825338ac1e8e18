"""Optional Bearer API keys. Replicas hold SHA-256 digests, never the keys, and compare in constant time."""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterable, Mapping

from serving.errors import APIError
from serving.spec import API_KEYS_ENV


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def configured_digests(spec_keys: Iterable[str], environ: Mapping[str, str] = os.environ) -> set[str]:
    """Digests of the spec's keys plus those in GEMMA_UNIFIED_API_KEYS (comma-separated)."""
    keys = [k.strip() for k in spec_keys] + [k.strip() for k in environ.get(API_KEYS_ENV, "").split(",")]
    return {digest(k) for k in keys if k}


class Authenticator:
    def __init__(self, digests: Iterable[str]) -> None:
        self.digests = frozenset(digests)

    @property
    def enabled(self) -> bool:
        return bool(self.digests)

    def owner(self, authorization: str | None) -> str:
        """Who is calling, as stored with their files and batches: the key's digest (checked first), or "" for
        everyone when no key is configured."""
        self.check(authorization)
        if not self.digests:
            return ""
        return digest(authorization.partition(" ")[2].strip())

    def check(self, authorization: str | None) -> None:
        if not self.digests:
            return
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise APIError(
                401,
                "no API key: send `Authorization: Bearer <key>`",
                code="missing_api_key",
                type="authentication_error",
            )
        candidate = digest(key.strip())
        # Compare against every digest so the time taken does not say which (if any) matched.
        matched = False
        for known in self.digests:
            matched |= hmac.compare_digest(candidate, known)
        if not matched:
            raise APIError(401, "incorrect API key", code="invalid_api_key", type="authentication_error")

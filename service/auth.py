"""API keys: when keys are configured, X-API-Key is required and owns the jobs it creates."""

import hashlib
import hmac

from fastapi.security import APIKeyHeader

from service.problems import ProblemError

# A security scheme, so the OpenAPI document says every /v1 operation takes the key and Swagger
# UI can send it; auto_error=False: a missing key is our 401 problem, not FastAPI's.
api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False)
OPEN_OWNER = "open"


def owner_of(key: str) -> str:
    """Jobs are stored under a digest of the key, never the key itself."""
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def authenticate(given: str | None, keys: list[str]) -> str:
    if not keys:
        return OPEN_OWNER
    given = given or ""
    # Compare with every key, in constant time, so timing tells nothing about which matched.
    matched = [hmac.compare_digest(given.encode(), key.encode()) for key in keys]
    if not given or not any(matched):
        raise ProblemError(
            401,
            "send a valid API key in the X-API-Key header",
            headers={"WWW-Authenticate": "X-API-Key"},
        )
    return owner_of(given)

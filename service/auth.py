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
    # Starlette decodes header values as latin-1, one character per byte, so encoding back to
    # latin-1 gives the bytes the client sent; a configured key is text, sent as UTF-8. So a
    # key "clé" matches the bytes 63 6c c3 a9, which is what clients send for it.
    sent = (given or "").encode("latin-1", errors="replace")
    # Compare with every key, in constant time, so timing tells nothing about which matched.
    matched = [key for key in keys if hmac.compare_digest(sent, key.encode())]
    if not sent or not matched:
        raise ProblemError(
            401,
            "send a valid API key in the X-API-Key header",
            headers={"WWW-Authenticate": "X-API-Key"},
        )
    return owner_of(matched[0])  # the configured key's digest: as before for ASCII keys

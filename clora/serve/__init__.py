"""``clora serve``: a Tinker-compatible training API and an OpenAI-compatible inference API over
one warm runtime (docs/serve.md).

Modules: ``server`` (runtime + uvicorn, shutdown), ``app`` (body limit, keys, errors, readiness),
``tinker_routes`` (the Tinker REST API: service, training, futures), ``tinker_sampling`` (its sampling),
``tinker_requests`` / ``tinker_wire`` (its JSON bodies and protobuf payloads), ``openai_routes`` /
``openai_wire``, ``bodies`` (reading a request), ``auth`` (API keys), ``futures`` (Tinker futures),
``state`` (what the server remembers), ``errors`` (HTTP status of each clora error).
"""

from typing import Any

from clora.serve.auth import KeyRing, Principal
from clora.serve.defaults import DEFAULT_MAX_BODY_BYTES, DEFAULT_PORT

__all__ = ["DEFAULT_MAX_BODY_BYTES", "DEFAULT_PORT", "KeyRing", "Principal", "Server"]


def __getattr__(name: str) -> Any:  # Server needs FastAPI and the runtime: imported when first used
    if name == "Server":
        from clora.serve.server import Server

        return Server
    raise AttributeError(name)

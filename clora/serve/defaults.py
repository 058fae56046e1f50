"""The server's defaults, importable without FastAPI (the CLI's parser reads them)."""

DEFAULT_PORT = 8765
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024  # a request body over this gets 413

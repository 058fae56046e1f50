"""``clora serve CONFIG``: the runtime of a TOML file behind the Tinker and OpenAI HTTP APIs (docs/serve.md).

API keys come from ``--keys FILE`` or ``$CLORA_SERVE_KEYS`` (never a key on the command line);
without keys only loopback clients are served. SIGTERM / Ctrl-C shut down gracefully (exit 0).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from clora.cli.exit_codes import EXIT_OK
from clora.errors import ConfigError

__all__ = ["add_serve_parser", "cmd_serve"]

LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


def add_serve_parser(sub: Any) -> None:
    from clora.serve.defaults import DEFAULT_MAX_BODY_BYTES, DEFAULT_PORT

    serve = sub.add_parser("serve", help="serve the Tinker training API and the OpenAI inference API over one runtime")
    serve.add_argument("config", help="runtime TOML ([model], [engine], [trainer], run_dir; experiments are ignored)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT)
    serve.add_argument("--keys", metavar="FILE", help="API keys JSON (else $CLORA_SERVE_KEYS; none: loopback only)")
    serve.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                       help="larger request bodies get 413")
    serve.add_argument("--model-name", help="the base model's name for clients (default: its folder name)")
    serve.add_argument("--run-dir", help="override run_dir of the file")
    serve.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"))
    serve.set_defaults(handler=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from clora.config import load_toml
    from clora.serve import KeyRing, Server

    if args.max_body_bytes < 1024:
        raise ConfigError(f"--max-body-bytes must be >= 1024, got {args.max_body_bytes}")
    config = load_toml(args.config)
    keys = KeyRing.load(args.keys)
    if not keys.enabled and args.host not in LOOPBACK_HOSTS:
        print(f"clora serve: no API keys configured; binding {args.host} still serves loopback clients only",
              file=sys.stderr)
    try:
        server = Server(config, host=args.host, port=args.port, keys=keys, max_body_bytes=args.max_body_bytes,
                        base_model_name=args.model_name, run_dir=args.run_dir, console_level=args.log_level)
    except OSError as e:
        raise ConfigError(f"cannot bind {args.host}:{args.port}: {e.strerror or e}") from None

    def ready(s: Any) -> None:
        print(f"clora serve: ready on {s.url} (model {s.state.base_model!r}; "
              f"{'API keys' if keys.enabled else 'loopback only'})", file=sys.stderr, flush=True)

    asyncio.run(server.serve(ready))
    return EXIT_OK



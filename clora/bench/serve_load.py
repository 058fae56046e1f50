"""``clora bench serve``: a bounded load check of ``clora serve`` on loopback.

One server on the tiny model and ``tinker`` Tinker training loops (forward_backward + optim_step +
save_weights_for_sampler + sample per step) plus ``chat`` OpenAI chat clients at once, each doing a
fixed number of rounds, stopped early at ``--max-seconds``. Reports requests, errors, p50 / p99
latency per kind, and RSS after a warm-up round and at the end.

``--engine scripted`` (default): the server runs in this process with the scripted engine, so this
measures the HTTP layer, the futures and the trainer, not vLLM; RSS covers clients and server.
``--engine vllm``: the server is a ``clora serve`` process on the real vLLM engine (model "tiny"),
and RSS is that process tree's (server + engine core), not the clients'.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from clora import events
from clora.serve.readiness import wait_until_ready

__all__ = ["main", "run_load"]


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run_load(*, tinker_clients: int, chat_clients: int, rounds: int, max_seconds: float,
             engine: str = "scripted") -> dict[str, Any]:
    from clora.bench.rss import tree_rss_bytes

    if engine == "vllm":
        folder = Path(tempfile.mkdtemp(prefix="clora-serve-load-"))
        with _serve_process(folder) as (url, pid):
            out = _drive(url, lambda: tree_rss_bytes(pid), lambda: (-1, -1), tinker_clients=tinker_clients,
                         chat_clients=chat_clients, rounds=rounds, max_seconds=max_seconds)
        out["http_requests"], out["http_errors"] = _counts(folder / "run" / "events.jsonl")
        return out
    if engine != "scripted":
        raise ValueError(f"engine: 'scripted' or 'vllm', got {engine!r}")
    from clora.config import ModelConfig, RuntimeConfig
    from clora.messages import Completion
    from clora.models import tiny_llama
    from clora.testing import FakeEngine
    from clora.testing.serve import serve_in_thread

    folder = Path(tempfile.mkdtemp(prefix="clora-serve-load-"))
    model = tiny_llama(folder / "tiny", seed=0)
    scripted = FakeEngine(lambda r: Completion(token_ids=[5, 6, 7, 8], logprobs=[-1.0] * 4, text="ok",
                                               finish_reason="stop"), decode_s=0.01)
    config = RuntimeConfig(model=ModelConfig(source=str(model)), run_dir=str(folder / "run"))
    with serve_in_thread(config, engine=scripted, base_model_name="tiny", console_level="error") as served:
        state = served.server.state
        return _drive(served.url, tree_rss_bytes, lambda: (state.requests, state.errors),
                      tinker_clients=tinker_clients, chat_clients=chat_clients, rounds=rounds, max_seconds=max_seconds)


@contextlib.contextmanager
def _serve_process(folder: Path) -> Iterator[tuple[str, int]]:
    """``clora serve`` on the real engine (tiny model) in its own process, run folder ``folder/run``; its
    URL and pid. Stopped with SIGTERM (graceful) on exit."""
    from clora.config import EngineConfig, ModelConfig, RuntimeConfig, dump_toml

    config = RuntimeConfig(model=ModelConfig(source="tiny", max_model_len=256),
                           engine=EngineConfig(max_loras=4, max_lora_rank=8, max_num_seqs=16, kv_cache_gib=1.0),
                           run_dir=str(folder / "run"))
    (folder / "serve.toml").write_bytes(dump_toml(config))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "clora.cli.main", "serve", "serve.toml", "--port", str(port),
                             "--model-name", "tiny"], cwd=folder, stdout=subprocess.DEVNULL,
                            stderr=open(folder / "serve.err", "wb"))
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_until_ready(url, proc, timeout_s=float("inf"))
        except RuntimeError:
            raise RuntimeError(f"clora serve exited with {proc.returncode}: see {folder / 'serve.err'}") from None
        yield url, proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()


def _counts(events_file: Path) -> tuple[int, int]:
    """(requests, error answers) from the server's ``serve.stopped`` event."""
    for line in reversed(events_file.read_text().splitlines()):
        event = json.loads(line)
        if event.get("event") == events.SERVE_STOPPED:
            return event["requests"], event["errors"]
    return -1, -1


def _drive(url: str, rss: Callable[[], int], counts: Callable[[], tuple[int, int]], *, tinker_clients: int,
           chat_clients: int, rounds: int, max_seconds: float) -> dict[str, Any]:
    import openai
    import tinker
    from tinker import types

    latencies: dict[str, list[float]] = {"tinker_step": [], "chat": []}
    errors: list[str] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + max_seconds

    def timed(kind: str, fn: Any) -> None:
        start = time.perf_counter()
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - counted and reported
            with lock:
                errors.append(f"{kind}: {type(e).__name__}: {e}"[:200])
            return
        with lock:
            latencies[kind].append(time.perf_counter() - start)

    tokens = list(range(5, 37))
    datum = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)})
    trainers: dict[int, Any] = {}

    def tinker_loop(i: int, n: int) -> None:
        if i not in trainers:
            trainers[i] = tinker.ServiceClient(base_url=url, api_key="tml-load").create_lora_training_client(
                base_model="tiny", rank=4, user_metadata={"clora_tenant": f"load-{i}"}).result()
        trainer = trainers[i]

        def step() -> None:
            trainer.forward_backward([datum], "cross_entropy").result()
            trainer.optim_step(types.AdamParams(learning_rate=1e-4)).result()
            sampler = trainer.save_weights_and_get_sampling_client()
            sampler.sample(types.ModelInput.from_ints(tokens[:8]), num_samples=2,
                           sampling_params=types.SamplingParams(max_tokens=4)).result()

        for _ in range(n):
            if time.perf_counter() > deadline:
                return
            timed("tinker_step", step)

    def chat_loop(i: int, n: int) -> None:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="tml-load", max_retries=0)
        for r in range(n):
            if time.perf_counter() > deadline:
                return
            timed("chat", lambda: client.chat.completions.create(
                model="tiny" if r % 2 else f"load-{i % max(tinker_clients, 1)}",
                messages=[{"role": "user", "content": f"question {r}"}], max_tokens=4, stream=r % 3 == 0))

    def run_all(n: int) -> float:
        start = time.perf_counter()
        threads = [threading.Thread(target=tinker_loop, args=(i, n)) for i in range(tinker_clients)]
        threads += [threading.Thread(target=chat_loop, args=(i, n)) for i in range(chat_clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.perf_counter() - start

    # warm-up: one round creates the tenants (the chat clients wait for them)
    warm = threading.Thread(target=lambda: [tinker_loop(i, 1) for i in range(tinker_clients)])
    warm.start()
    warm.join()
    for v in latencies.values():
        v.clear()
    rss_before = rss()
    wall = run_all(rounds)
    rss_after = rss()
    server_counts = counts()
    return {"latencies": latencies, "errors": errors, "wall_s": wall, "rss_before": rss_before,
            "rss_after": rss_after, "http_requests": server_counts[0], "http_errors": server_counts[1]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clora bench serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tinker", type=int, default=4, help="Tinker training loops at once")
    parser.add_argument("--chat", type=int, default=4, help="OpenAI chat clients at once")
    parser.add_argument("--rounds", type=int, default=20, help="steps / requests per client")
    parser.add_argument("--max-seconds", type=float, default=300.0, help="stop starting new rounds after this")
    parser.add_argument("--engine", choices=("scripted", "vllm"), default="scripted",
                        help="scripted: in-process server, scripted engine; vllm: a clora serve process on vLLM")
    args = parser.parse_args(argv)
    out = run_load(tinker_clients=args.tinker, chat_clients=args.chat, rounds=args.rounds,
                   max_seconds=args.max_seconds, engine=args.engine)
    print(f"{args.tinker} Tinker loops + {args.chat} chat clients, {args.rounds} rounds each, "
          f"{args.engine} engine, {out['wall_s']:.1f} s wall")
    print(f"{'kind':<12} {'done':>6} {'p50_s':>8} {'p99_s':>8}")
    for kind, values in out["latencies"].items():
        print(f"{kind:<12} {len(values):>6} {_percentile(values, 0.5):>8.3f} {_percentile(values, 0.99):>8.3f}")
    print(f"HTTP requests {out['http_requests']}, HTTP error answers {out['http_errors']}, "
          f"client errors {len(out['errors'])}")
    for error in out["errors"][:5]:
        print("  ", error)
    mib = 1024 * 1024
    whose = "server process tree" if args.engine == "vllm" else "this process (clients + server)"
    print(f"RSS of {whose} after warm-up {out['rss_before'] / mib:.0f} MiB, at the end {out['rss_after'] / mib:.0f} MiB "
          f"({(out['rss_after'] - out['rss_before']) / mib:+.0f} MiB)")
    return 0 if not out["errors"] else 1

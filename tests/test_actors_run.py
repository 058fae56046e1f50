"""Actor kernel: ``actors.run`` uses uvloop when installed (asyncio otherwise)."""

import asyncio

import msgspec
import pytest

import actors
from actors import Actor, ActorCrashed, ActorSystem, handler

pytestmark = pytest.mark.timeout(10)

uvloop = pytest.importorskip("uvloop")


class Square(msgspec.Struct, frozen=True, tag=True):
    x: int


class Squarer(Actor):
    @handler(concurrent=True)
    async def square(self, msg: Square) -> int:
        if msg.x < 0:
            raise ValueError("negative")
        await asyncio.sleep(0)
        return msg.x * msg.x


async def _main() -> tuple[type, list[int]]:
    async with ActorSystem("t") as system:
        ref = await system.start(Squarer(), name="squarer")
        results = await asyncio.gather(*(ref.ask(Square(x=i)) for i in range(4)))
    return type(asyncio.get_running_loop()), results


def test_run_uses_uvloop_when_installed():
    assert actors.uvloop_available()
    loop_type, results = actors.run(_main)
    assert issubclass(loop_type, uvloop.Loop)
    assert results == [0, 1, 4, 9]


def test_run_can_force_the_asyncio_loop():
    loop_type, results = actors.run(_main, use_uvloop=False)
    assert not issubclass(loop_type, uvloop.Loop)
    assert results == [0, 1, 4, 9]


def test_escalation_propagates_out_of_run():
    async def crash() -> None:
        async with ActorSystem("t") as system:
            ref = await system.start(Squarer(), name="squarer")
            await ref.tell(Square(x=-1))
            await asyncio.sleep(5)

    with pytest.raises(ActorCrashed, match="negative"):
        actors.run(crash)


SIGTERM_SCRIPT = """
import asyncio, sys
from pathlib import Path
import actors
from actors import Actor, ActorSystem

class Holder(Actor):
    async def on_stop(self):
        Path(sys.argv[1]).write_text("stopped cleanly")

async def main():
    async with ActorSystem("t") as system:
        await system.start(Holder(), name="holder")
        print("ready", flush=True)
        await asyncio.sleep(60)

actors.run(main)
"""


def test_sigterm_unwinds_the_actor_system_and_exits_143(tmp_path):
    import signal
    import subprocess
    import sys

    marker = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, "-c", SIGTERM_SCRIPT, str(marker)], stdout=subprocess.PIPE, text=True)
    try:
        while (line := proc.stdout.readline()) and line.strip() != "ready":  # structlog lines come first
            pass
        assert line.strip() == "ready"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=8) == 128 + signal.SIGTERM
    finally:
        proc.kill()
    assert marker.read_text() == "stopped cleanly"

"""A multiprocessing child that loads clora's parent-watch plugin the way vLLM's processes do."""

import time

from clora.sampler.parent_watch import register


def run() -> None:
    register()
    print("registered", flush=True)  # the test kills the parent only after this line
    time.sleep(60)

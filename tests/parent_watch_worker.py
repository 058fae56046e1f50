"""A multiprocessing child that loads clora's parent-watch plugin the way vLLM's processes do."""

import sys
import time

from clora.sampler.parent_watch import register


def run() -> None:
    register()
    # One write (stdout may be unbuffered, where print writes the text and its newline apart) on the
    # pipe the runtime process shares: the test kills the parent only after this line.
    sys.stdout.write("registered\n")
    sys.stdout.flush()
    time.sleep(60)

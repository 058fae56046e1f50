"""The ``clora`` command: ``run``, ``events``, ``export``, ``sample``, ``bench``."""

from clora.cli.main import main

__all__ = ["main"]

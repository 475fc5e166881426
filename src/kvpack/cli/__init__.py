"""The `kvpack` command line."""
from kvpack.cli.app import app

__all__ = ["app"]

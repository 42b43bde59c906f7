"""OpenAI-compatible serving (FastAPI + uvicorn): `loramix serve CKPT`."""

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # FastAPI and torch: imported on first use, so that serve.config is light (`loramix --help`)
    from .app import create_app
    from .engine import Engine, Job

__all__ = ["Engine", "Job", "create_app"]


def __getattr__(name: str) -> object:
    """create_app, Engine and Job, imported when first used (PEP 562)."""
    if name == "create_app":
        from .app import create_app as value
    elif name in ("Engine", "Job"):
        from . import engine

        value = getattr(engine, name)
    else:
        raise AttributeError(f"module 'loramix.serve' has no attribute {name!r}")
    globals()[name] = value
    return value

"""OpenAI-compatible serving (FastAPI + uvicorn): `loramix serve CKPT`."""

from .app import create_app
from .engine import Engine, Job

__all__ = ["Engine", "Job", "create_app"]

"""dynprune.serve: adaptive-compute inference over HTTP (FastAPI + uvicorn; Ray Serve for replicas).

`dynprune serve --checkpoint DIR` (or ``--model PATH``): classifiers and causal LMs; see docs/serving.md.
Needs the ``serve`` extra: ``pip install 'dynprune[serve]'``.
"""

from .app import create_app
from .config import ServeConfig
from .engine import ClassifierEngine, StartupError, load_engine
from .generator import GeneratorEngine

__all__ = ["ClassifierEngine", "GeneratorEngine", "ServeConfig", "StartupError", "create_app", "load_engine"]

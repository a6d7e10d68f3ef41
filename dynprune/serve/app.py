"""create_app(engine, cfg): the FastAPI app (routes, error handlers, middleware, lifespan)."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI

import dynprune

from .config import ServeConfig
from .engine import ClassifierEngine
from .errors import install_error_handlers
from .fast_classify import FastClassify
from .generator import GeneratorEngine
from .middleware import BodyGuard, Timing
from .routes import classify, generate, system
from .runtime import Runtime

TIMED_PATHS = {"/v1/classify", "/v1/generate", "/v1/completions", "/health", "/metrics"}


def create_app(engine: ClassifierEngine | GeneratorEngine, cfg: ServeConfig) -> FastAPI:
    """An app serving ``engine`` (already loaded and warmed) with the limits in ``cfg``."""
    rt = Runtime(engine, cfg)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        rt.batcher.start()
        try:
            yield
        finally:  # after the HTTP server drained its connections: finish queued work
            rt.draining = True
            await rt.batcher.close()

    app = FastAPI(
        title="dynprune serve",
        version=dynprune.__version__,
        description="Adaptive-compute inference: each request chooses its FLOPs budget; "
        "concurrent requests at different budgets share one forward.",
        lifespan=lifespan,
    )
    app.state.runtime = rt
    install_error_handlers(app, rt.metrics.reject)
    for module in (classify, generate, system):
        app.include_router(module.router)
    app.add_middleware(FastClassify, runtime=rt)  # innermost: after the body guard, inside the timing
    app.add_middleware(BodyGuard, max_bytes=cfg.max_body_bytes, reject=rt.metrics.reject)
    app.add_middleware(
        Timing,
        observe=lambda path, status, s: rt.metrics.latency.labels(path, str(status)).observe(s),
        paths=TIMED_PATHS,
    )
    return app

"""`dynprune serve (--checkpoint DIR | --model PATH) [...]`: check everything, load and warm the
model, then serve on uvicorn until SIGTERM/SIGINT (which drains: in-flight requests finish,
new ones are refused). Exit codes: 0 clean shutdown, 2 bad arguments, 1 cannot start."""

from __future__ import annotations

import argparse
import errno
import socket
import sys
from dataclasses import fields

from .config import ServeConfig

_DEFAULTS = ServeConfig()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dynprune serve",
        description="Serve a gated model over HTTP: POST /v1/classify (classifiers) or /v1/generate and "
        "/v1/completions (causal LMs), GET /health, /metrics, /docs.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="gated model directory (dynprune train / save_gated_model)")
    src.add_argument(
        "--model",
        help="plain local HF classifier or causal LM (safetensors directory, or a .gguf file), open gates",
    )
    p.add_argument("--host", default=_DEFAULTS.host, help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=_DEFAULTS.port)
    p.add_argument(
        "--max-batch", type=int, default=_DEFAULTS.max_batch, help="texts (or sequences) per forward"
    )
    p.add_argument(
        "--max-wait-ms", type=float, default=_DEFAULTS.max_wait_ms, help="how long a text waits for company"
    )
    p.add_argument(
        "--max-queue", type=int, default=_DEFAULTS.max_queue, help="texts that may wait; beyond: 429"
    )
    p.add_argument("--timeout-s", type=float, default=_DEFAULTS.timeout_s, help="per request; beyond: 504")
    p.add_argument("--max-texts", type=int, default=_DEFAULTS.max_texts, help="texts per request")
    p.add_argument("--max-text-chars", type=int, default=_DEFAULTS.max_text_chars)
    p.add_argument("--max-length", type=int, default=_DEFAULTS.max_length, help="tokens per text (truncated)")
    p.add_argument("--pad-multiple", type=int, default=_DEFAULTS.pad_multiple)
    p.add_argument("--max-body-bytes", type=int, default=_DEFAULTS.max_body_bytes)
    p.add_argument("--threads", type=int, default=_DEFAULTS.threads, help="torch threads (0: torch default)")
    p.add_argument(
        "--govern-mean",
        action="store_true",
        help="mean budgets: one governor per budget keeps the server's running mean FLOPs on target",
    )
    p.add_argument(
        "--untrained-budgets",
        action="store_true",
        help="--model: accept budgets below 1.0 although its router is untrained (smoke tests only)",
    )
    p.add_argument("--seed", type=int, default=0, help="--model: seed of the new head/router weights")
    p.add_argument(
        "--replicas", type=int, default=1, help=">1: run N replicas under Ray Serve (dynprune[ray])"
    )
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    return ServeConfig(**{f.name: getattr(args, f.name) for f in fields(ServeConfig)})


def bind(host: str, port: int) -> socket.socket:
    """Bind now (before the minutes of loading), so a busy port fails at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        why = "is already in use" if err.errno == errno.EADDRINUSE else f"cannot be bound ({err.strerror})"
        raise OSError(f"port {port} on {host} {why}; choose another with --port") from err
    sock.set_inheritable(True)
    return sock


def _fail(message: str, code: int) -> int:
    print(f"dynprune serve: error: {message}", file=sys.stderr)
    return code


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as err:
        return _fail(str(err), 2)
    if args.replicas < 1:
        return _fail(f"--replicas must be >= 1, got {args.replicas}", 2)
    if args.untrained_budgets and args.model is None:
        return _fail("--untrained-budgets is for --model (a checkpoint's router is trained)", 2)
    if args.model is not None and not args.untrained_budgets:
        print(
            "dynprune serve: note: --model wraps the model with an untrained router: only budget 1.0 (the "
            "original model) is served; train gates with `dynprune train` and serve them with --checkpoint",
            file=sys.stderr,
            flush=True,
        )
    if args.replicas > 1:
        from .ray_app import serve_replicas

        return serve_replicas(cfg, args.checkpoint, args.model, args.replicas, args.seed)
    try:
        sock = bind(cfg.host, cfg.port)
    except OSError as err:
        return _fail(str(err), 1)
    import torch
    import uvicorn

    from .app import create_app
    from .engine import StartupError, load_engine

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    print(f"dynprune serve: loading {args.checkpoint or args.model} ...", file=sys.stderr, flush=True)
    try:
        engine = load_engine(cfg, checkpoint=args.checkpoint, model=args.model, seed=args.seed)
    except StartupError as err:
        sock.close()
        return _fail(str(err), 1)
    app = create_app(engine, cfg)
    rt = app.state.runtime

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:  # SIGTERM/SIGINT: refuse new work at once
            rt.draining = True
            super().handle_exit(sig, frame)
            # uvicorn re-raises the signal after shutting down; a drained shutdown exits 0 instead
            self._captured_signals.clear()

    host, port = sock.getsockname()[:2]
    server = DrainingServer(
        uvicorn.Config(
            app,
            log_level=args.log_level,
            timeout_graceful_shutdown=int(cfg.timeout_s) + 5,
            access_log=False,
        )
    )
    print(f"dynprune serve: ready on http://{host}:{port} (docs: /docs)", file=sys.stderr, flush=True)
    server.run(sockets=[sock])
    print("dynprune serve: stopped (in-flight requests finished)", file=sys.stderr, flush=True)
    return 0

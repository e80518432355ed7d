"""`readmoe serve`: the engine behind an OpenAI-compatible HTTP API (FastAPI + uvicorn), SSE streaming, Prometheus.

protocol.py holds the request shapes, metrics.py the Prometheus metrics, app.py the routes; `serve()` runs it.
"""

from __future__ import annotations

from .app import build_app


def serve(app, host: str = "127.0.0.1", port: int = 8000, drain_timeout: float = 30.0, log_level: str = "warning") -> None:
    """Run uvicorn until SIGINT/SIGTERM. A signal drains: /health and new requests answer 503 at once, running
    requests finish (cut after `drain_timeout` seconds), then the engine thread stops and the process exits 0."""
    import signal

    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            app.state.server.draining = True
            super().handle_exit(sig, frame)
            # uvicorn re-raises captured signals after shutdown (exit -15); a completed drain is a clean exit
            captured = getattr(self, "_captured_signals", None)
            if sig == signal.SIGTERM and captured and captured[-1] == sig:
                captured.pop()

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=drain_timeout,
                            access_log=False)
    DrainingServer(config).run()


__all__ = ["build_app", "serve"]

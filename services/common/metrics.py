"""Prometheus metrics every server records, and the HTTP endpoint that serves them."""

from __future__ import annotations

import logging
import socket
import threading
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import REGISTRY, Counter, Histogram, make_wsgi_app

__all__ = [
    "GRPC_SERVER_HANDLED",
    "GRPC_SERVER_HANDLING_SECONDS",
    "GRPC_SERVER_STARTED",
    "MetricsServer",
    "start_metrics_server",
]

logger = logging.getLogger(__name__)

# Names and labels follow go-grpc-prometheus, so the usual gRPC dashboards work as-is.
GRPC_SERVER_STARTED = Counter(
    "grpc_server_started_total",
    "RPCs started on the server.",
    ["grpc_service", "grpc_method"],
)
GRPC_SERVER_HANDLED = Counter(
    "grpc_server_handled_total",
    "RPCs completed on the server, by status code.",
    ["grpc_service", "grpc_method", "grpc_code"],
)
GRPC_SERVER_HANDLING_SECONDS = Histogram(
    "grpc_server_handling_seconds",
    "Time from an RPC's start to its completion on the server.",
    ["grpc_service", "grpc_method"],
    # Up to an hour: a WatchTraining stream lives as long as its training run.
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600),
)


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    """One thread per scrape; daemon threads so a hung scrape never blocks exit."""

    daemon_threads = True


class _SilentHandler(WSGIRequestHandler):
    """No access log line per scrape."""

    def log_message(self, format: str, *args: Any) -> None:
        """Log nothing."""


class MetricsServer:
    """A running ``/metrics`` HTTP endpoint over the default registry."""

    def __init__(self, httpd: WSGIServer) -> None:
        self._httpd = httpd
        self._thread = threading.Thread(
            # A short poll interval: stop() waits for the loop to notice, once per interval.
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="metrics-http",
            daemon=True,
        )
        self._thread.start()
        self._stopped = False
        self._lock = threading.Lock()

    @property
    def port(self) -> int:
        """The port actually bound (the real one when 0 was asked for)."""
        return int(self._httpd.server_address[1])

    @property
    def host(self) -> str:
        """The address bound."""
        return str(self._httpd.server_address[0])

    def stop(self) -> None:
        """Stop serving and close the socket; safe to call more than once."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def start_metrics_server(host: str, port: int) -> MetricsServer:
    """Serve the default registry's metrics over HTTP on ``host:port`` (0 = any free port).

    Every path answers with the metrics, ``/metrics`` included, as prometheus_client's
    own server does.
    """
    family, _, _, _, sockaddr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]

    class Server(_ThreadingWSGIServer):
        address_family = family

    httpd = make_server(
        str(sockaddr[0]), port, make_wsgi_app(REGISTRY), Server, handler_class=_SilentHandler
    )
    server = MetricsServer(httpd)
    logger.info("metrics on http://%s/metrics", _host_port(host, server.port))
    return server


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

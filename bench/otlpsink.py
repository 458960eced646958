"""A local OTLP/HTTP trace sink for the benchmark: accepts and discards exports, counts spans.

``POST /v1/traces`` on 127.0.0.1 (protobuf ``ExportTraceServiceRequest``), served by a thread
of the bench process. Each body is decoded only to count its spans, so a run whose tracing
exported nothing shows 0 (bench/report.py flags it).
"""

from __future__ import annotations

import gzip
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

_ANSWER = ExportTraceServiceResponse().SerializeToString()


def count_spans(body: bytes) -> int:
    request = ExportTraceServiceRequest.FromString(body)
    return sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)


class OtlpSink:
    """Counts the spans and export requests it receives; keeps nothing else."""

    def __init__(self) -> None:
        self.spans = 0
        self.requests = 0
        self.bad_requests = 0
        self._lock = threading.Lock()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the exporter's session expects

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                try:
                    if self.headers.get("Content-Encoding", "").lower() == "gzip":
                        body = gzip.decompress(body)
                    n, status = count_spans(body), 200
                except Exception:  # a body that does not decode: counted, answered 400
                    n, status = -1, 400
                with sink._lock:
                    if n < 0:
                        sink.bad_requests += 1
                    else:
                        sink.requests += 1
                        sink.spans += n
                self.send_response(status)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(_ANSWER)))
                self.end_headers()
                self.wfile.write(_ANSWER)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1/traces"

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {"spans": self.spans, "requests": self.requests, "bad": self.bad_requests}

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

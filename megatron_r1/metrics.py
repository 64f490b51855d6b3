"""An optional Prometheus text-format endpoint (`--metrics-port`) serving the latest training
figures from the logging rank; standard library only."""

import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def _metric_name(name: str) -> str:
    return "megatron_r1_" + re.sub(r"[^a-zA-Z0-9_]", "_", name.strip().lower()).strip("_")


class MetricsServer:
    """`update({...})` replaces the published figures; GET /metrics renders them."""

    def __init__(self, port: int, host: str = "0.0.0.0"):
        self._values: dict[str, float] = {}
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404)
                    return
                body = server.render().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # keep the training log clean
                pass

        self._httpd = ThreadingHTTPServer((host, port), Handler)
        self.port = self._httpd.server_address[1]
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    def update(self, values: dict) -> None:
        flat = {}
        for name, value in values.items():
            if isinstance(value, dict):  # per-layer figures: one labelled series per key
                flat.update({f'{_metric_name(name)}{{layer="{key}"}}': v for key, v in value.items()})
            elif value is not None:
                flat[_metric_name(name)] = value
        with self._lock:
            self._values = flat

    def render(self) -> str:
        with self._lock:
            lines = []
            for name, value in sorted(self._values.items()):
                base = name.split("{")[0]
                if f"# TYPE {base} gauge" not in lines:
                    lines.append(f"# TYPE {base} gauge")
                lines.append(f"{name} {float(value)!r}")
        return "\n".join(lines) + "\n"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

"""Start a trip from a web handler: ``python -m tripapp.web --port 8080`` (standard library only).

``POST /trips`` with the trip as JSON calls ``engine.start`` in the handler's own thread (a
``ThreadingHTTPServer`` runs one per request) and answers 202 with the saga id at once; it does
not wait for the saga. ``GET /trips/<id>`` answers the saga's state and its steps' states. An
``Idempotency-Key`` header makes a repeated POST return the first trip's id.
"""

from __future__ import annotations

import argparse
import json
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from sagas import (
    IdempotencyConflictError,
    InvalidSagaInputError,
    SagaNotFoundError,
    StoreUnavailableError,
)
from tripapp import engine, trip

MAX_BODY = 64 * 1024
MAX_KEY = 200  # the store's idempotency key column


class TripHandler(BaseHTTPRequestHandler):
    timeout = 30  # seconds a client may take to send its request (a body shorter than declared)

    def do_POST(self) -> None:
        if self.path.rstrip("/") != "/trips":
            return self.reply(HTTPStatus.NOT_FOUND, {"error": "not found"})
        declared = (self.headers.get("Content-Length") or "0").strip()
        if not declared.isascii() or not declared.isdigit():
            return self.reply(HTTPStatus.BAD_REQUEST, {"error": "bad Content-Length"})
        length = int(declared)
        if length > MAX_BODY:
            return self.reply(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": "body too large"})
        key = self.headers.get("Idempotency-Key")
        if key is not None and not 0 < len(key) <= MAX_KEY:
            return self.reply(HTTPStatus.BAD_REQUEST,
                              {"error": f"Idempotency-Key must be 1 to {MAX_KEY} characters"})
        try:
            data = json.loads(self.rfile.read(length) or b"null")
            handle = engine.start(trip, data, idempotency_key=key)
        except (ValueError, RecursionError, InvalidSagaInputError) as exc:
            # Not JSON, not UTF-8, nested past the parser's depth, or refused by TripRequest.
            return self.reply(HTTPStatus.UNPROCESSABLE_ENTITY, {"error": str(exc) or "invalid"})
        except IdempotencyConflictError as exc:
            return self.reply(HTTPStatus.CONFLICT, {"error": str(exc)})
        except StoreUnavailableError as exc:
            return self.reply(HTTPStatus.SERVICE_UNAVAILABLE, {"error": str(exc)})
        self.reply(HTTPStatus.ACCEPTED, {"id": handle.id}, location=f"/trips/{handle.id}")

    def do_GET(self) -> None:
        prefix, _, saga_id = self.path.rstrip("/").rpartition("/")
        if prefix != "/trips" or not saga_id:
            return self.reply(HTTPStatus.NOT_FOUND, {"error": "not found"})
        try:
            outcome = engine.handle(saga_id).outcome()
        except SagaNotFoundError as exc:
            return self.reply(HTTPStatus.NOT_FOUND, {"error": str(exc)})
        except StoreUnavailableError as exc:
            return self.reply(HTTPStatus.SERVICE_UNAVAILABLE, {"error": str(exc)})
        self.reply(HTTPStatus.OK, {
            "id": outcome.id, "state": outcome.state, "error": outcome.error,
            "steps": {name: s.state for name, s in outcome.steps.items()},
        })

    def do_other(self) -> None:
        """Any other method: 405 naming the two it takes (http.server's default is a 501)."""
        self.reply(HTTPStatus.METHOD_NOT_ALLOWED, {"error": f"{self.command} not allowed"},
                   allow="GET, POST")

    do_PUT = do_DELETE = do_PATCH = do_other  # noqa: N815 - http.server's method names

    def reply(self, status: HTTPStatus, body: dict[str, Any], location: str | None = None,
              allow: str | None = None) -> None:
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        if location:
            self.send_header("Location", location)
        if allow:
            self.send_header("Allow", allow)
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet; a real app would log through `logging`


def make_server(host: str = "127.0.0.1", port: int = 8080) -> ThreadingHTTPServer:
    """The server, bound (port 0: any free port, see ``server.server_address``)."""
    return ThreadingHTTPServer((host, port), TripHandler)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()
    server = make_server(args.host, args.port)
    print(f"trips on http://{args.host}:{server.server_address[1]}/trips")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()

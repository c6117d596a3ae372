"""The naive stdlib server a Python developer writes first, in the style of the project's seed.

HTTPServer (one request at a time, the default listen backlog of 5), HTTP/1.0 (a new
connection per request), the access log on stderr, a dict of every value in memory and
one file per key in a data dir, loaded at start:
  GET /set?<key>=<value>   store value under key
  GET /get?key=<key>       the value, or 404
With --fsync a write is fsynced (the file only: no rename, no folder fsync).
Usage: python naive.py [--port N] [--data-dir D] [--fsync]
"""

import argparse
import contextlib
import os
from http.server import BaseHTTPRequestHandler, HTTPServer
from urllib.parse import parse_qs, urlsplit

DATA: dict[str, str] = {}


class Handler(BaseHTTPRequestHandler):
    data_dir = "data"
    fsync = False

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        if url.path not in ("/get", "/set"):
            self.send_error(404, "use /set?<key>=<value> or /get?key=<key>")
        elif len(query) != 1:
            self.send_error(400, "the query is one field=value pair")
        elif url.path == "/set":
            [(key, [value, *_])] = query.items()
            if "/" in key or key.startswith("."):
                self.send_error(400, "a key is a file name")
                return
            with open(os.path.join(self.data_dir, key), "w") as file:
                file.write(value)
                if self.fsync:
                    file.flush()
                    os.fsync(file.fileno())
            DATA[key] = value
            self.respond(200, "")
        elif "key" not in query:
            self.send_error(400, "use /get?key=<key>")
        elif query["key"][0] not in DATA:
            self.respond(404, "")
        else:
            self.respond(200, DATA[query["key"][0]])

    def respond(self, code: int, body: str) -> None:
        data = body.encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def load(data_dir: str) -> None:
    os.makedirs(data_dir, exist_ok=True)
    for name in os.listdir(data_dir):
        path = os.path.join(data_dir, name)
        if not name.startswith(".") and os.path.isfile(path):
            with open(path) as file:
                DATA[name] = file.read()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=4000)
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--fsync", action="store_true")
    args = parser.parse_args()
    Handler.data_dir, Handler.fsync = args.data_dir, args.fsync
    load(args.data_dir)
    server = HTTPServer(("127.0.0.1", args.port), Handler)
    print(f"naive serving http://127.0.0.1:{server.server_address[1]}/ with {len(DATA)} keys", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()

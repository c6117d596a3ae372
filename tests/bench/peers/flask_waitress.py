"""What a Python developer would write instead of kvserver: /get and /set in Flask, served by waitress.

Values live in a dict and in one file per key in a data dir, loaded at start:
  GET /set?<key>=<value>   store value under key
  GET /get?key=<key>       the value, or 404
With --fsync a write is fsynced (the file only: no rename, no folder fsync).
waitress runs with its defaults (4 worker threads) unless --threads says otherwise.
Usage: python flask_waitress.py [--port N] [--data-dir D] [--fsync] [--threads N]
"""

import argparse
import contextlib
import os

from flask import Flask, abort, request
from waitress.server import create_server

app = Flask(__name__)
DATA: dict[str, str] = {}
CONFIG = {"data_dir": "data", "fsync": False}


@app.get("/set")
def set_value() -> str:
    if len(request.args) != 1:
        abort(400, "use /set?<key>=<value>")
    [(key, value)] = request.args.items()
    if "/" in key or key.startswith("."):
        abort(400, "a key is a file name")
    with open(os.path.join(CONFIG["data_dir"], key), "w") as file:
        file.write(value)
        if CONFIG["fsync"]:
            file.flush()
            os.fsync(file.fileno())
    DATA[key] = value
    return ""


@app.get("/get")
def get_value() -> str:
    key = request.args.get("key", "")
    if key not in DATA:
        abort(404)
    return DATA[key]


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
    parser.add_argument("--threads", type=int, default=4)
    args = parser.parse_args()
    CONFIG.update(data_dir=args.data_dir, fsync=args.fsync)
    load(args.data_dir)
    server = create_server(app, host="127.0.0.1", port=args.port, threads=args.threads)
    print(f"flask+waitress serving http://127.0.0.1:{server.effective_port}/ with {len(DATA)} keys", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.run()

"""Hostile and malformed HTTP requests against a real `fastardiff serve` (loopback only); writes
docs/bad-inputs-http.md (a table: request, HTTP status, JSON message) and docs/bad-inputs-http.json.

    .venv/bin/python benchmarks/bad_inputs_http.py --engine DIR [--out docs/bad-inputs-http]

One server is started (a local Ray instance), every case is sent as written here (hand-written HTTP/1.1 where a
client library would not send it), and each answer is checked: a JSON body, the expected status, a one-line
error without a traceback. The script exits 1 when any case is not clean. Then the server is stopped (SIGTERM).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

POST = b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
JSON = b"Content-Type: application/json\r\n"


def req(body: bytes, content_type: bytes | None = b"application/json", extra: bytes = b"", method=b"POST",
        path=b"/generate") -> tuple[bytes, list]:
    head = method + b" " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
    if content_type is not None:
        head += b"Content-Type: " + content_type + b"\r\n"
    if b"Content-Length" not in extra and b"Transfer-Encoding" not in extra:
        head += b"Content-Length: %d\r\n" % len(body)
    return head + extra + b"\r\n", [body]


CHUNKED = [b"8000\r\n" + b" " * 0x8000 + b"\r\n"] * 6 + [b"0\r\n\r\n"]
# (what, (head, body parts), expected status)
CASES = [
    ("JSON nested 30000 levels deep", req(b"[" * 30000 + b"]" * 30000), 400),
    ("JSON nested 9 levels inside the object", req(b'{"prompt": ' + b"[" * 9 + b'"7"' + b"]" * 9 + b"}"), 400),
    ("seed of 300 digits", req(b'{"prompt": "7", "seed": ' + b"8" * 300 + b"}"), 422),
    ("seed of 4400 digits (past Python's int parsing limit)", req(b'{"prompt": "7", "seed": ' + b"1" * 4400 + b"}"),
     422),
    ("num_images of minus 500 digits", req(b'{"prompt": "7", "num_images": -' + b"5" * 500 + b"}"), 422),
    ("temperature 1e999", req(b'{"prompt": "7", "temperature": 1e999}'), 422),
    ("cfg_scale -Infinity", req(b'{"prompt": "7", "cfg_scale": -Infinity}'), 400),
    ("lone high surrogate in the prompt", req(b'{"prompt": "\\ud83d"}'), 400),
    ("lone low surrogate in a list item", req(b'{"prompt": ["1", "\\udc00"]}'), 400),
    ("lone surrogate as a field name", req(b'{"\\udbff": "7"}'), 400),
    ("surrogate encoded as UTF-8 bytes", req(b'{"prompt": "\xed\xb0\x80"}'), 400),
    ("invalid UTF-8", req(b'{"prompt": "\xc3\x28"}'), 400),
    ("prompt given twice", req(b'{"prompt": "1", "seed": 2, "prompt": "3"}'), 400),
    ("body text/plain", req(b'{"prompt": "7"}', b"text/plain"), 415),
    ("body form-encoded (curl -d default)", req(b"prompt=7", b"application/x-www-form-urlencoded"), 415),
    ("JSON in latin-1", req(b'{"prompt": "7"}', b"application/json; charset=iso-8859-1"), 415),
    ("Content-Length of 10^12", (POST + JSON + b"Content-Length: 1000000000000\r\n\r\n", []), 413),
    ("chunked body of 192 KiB (refused once 64 KiB are read)", (POST + JSON + b"Transfer-Encoding: chunked\r\n\r\n", CHUNKED), 413),
    ("body 'null'", req(b"null"), 400),
    ("body '[]'", req(b"[]"), 400),
    ("empty body", req(b""), 400),
    ("truncated JSON", req(b'{"prompt": "7", "seed": 1'), 400),
    ("field name of 10000 characters", req(b'{"prompt": "7", "' + b"f" * 10000 + b'": 1}'), 422),
    ("4000 unknown fields", req(("{" + ",".join(f'"f{i}": {i}' for i in range(4000)) + "}").encode()), 422),
    ("prompt of 60000 characters", req(b'{"prompt": "' + b"z" * 60000 + b'"}'), 422),
    ("prompt list of 65 classes", req(json.dumps({"prompt": ["7"] * 65}).encode()), 422),
    ("cfg_scale an object", req(b'{"prompt": "7", "cfg_scale": {"x": 1}}'), 422),
    ("seed true", req(b'{"prompt": "7", "seed": true}'), 422),
    ("mode with a NUL", req(b'{"prompt": "7", "mode": "target\\u0000"}'), 422),
    ("gamma 1e3", req(b'{"prompt": "7", "gamma": 1e3}'), 422),
    ("gamma 500 (more than the verify engine takes)", req(b'{"prompt": "7", "gamma": 500}'), 422),
    ("GET /generate", req(b"", None, method=b"GET"), 405),
    ("DELETE /health", req(b"", None, method=b"DELETE", path=b"/health"), 405),
    ("unknown route", req(b"{}", path=b"/v1/generate"), 404),
]


def send(port: int, head: bytes, parts, timeout: float = 120.0) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head)
        try:
            for part in parts:
                s.sendall(part)
        except OSError:                      # answered (and closed) before the whole body was sent
            pass
        data = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
    head_text, _, body = data.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in head_text.lower():
        body = _unchunk(body)
    return int(head_text.split()[1]), body


def _unchunk(body: bytes) -> bytes:
    out = b""
    while body:
        size, _, rest = body.partition(b"\r\n")
        n = int(size, 16)
        if n == 0:
            break
        out, body = out + rest[:n], rest[n + 2:]
    return out


def check(status: int, body: bytes, expected: int) -> tuple[bool, str]:
    try:
        payload = json.loads(body)
    except ValueError:
        return False, f"not JSON: {body[:120]!r}"
    message = payload.get("error", "") if isinstance(payload, dict) else ""
    clean = (status == expected and isinstance(message, str) and message and "\n" not in message
             and "Traceback" not in message and len(message) <= 500)
    return clean, message


def start_server(engine: str, port: int, log_path: Path) -> subprocess.Popen:
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "fastardiff", "serve", "--engine", engine, "--port", str(port)],
                            stdout=open(log_path, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + 300
    while "serving " not in log_path.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"the server did not start: {log_path.read_text()[-2000:]}")
        time.sleep(0.5)
    return proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", required=True)
    parser.add_argument("--out", default="docs/bad-inputs-http", help="writes OUT.md and OUT.json")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_path = Path(tempfile.mkdtemp(prefix="bad-inputs-http-")) / "serve.log"
    proc = start_server(args.engine, port, log_path)
    rows = []
    try:
        for what, (head, parts), expected in CASES:
            status, body = send(port, head, parts)
            clean, message = check(status, body, expected)
            rows.append({"request": what, "status": status, "expected": expected, "clean": clean,
                         "message": message})
            print(f"{'ok ' if clean else 'BAD'} {status} {what}: {message[:100]}", flush=True)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
    Path(args.out + ".json").write_text(json.dumps({"server_exit": proc.returncode, "cases": rows}, indent=1) + "\n")
    lines = ["# Hostile HTTP requests to `fastardiff serve`", "",
             "Written by `benchmarks/bad_inputs_http.py` against a real server on 127.0.0.1 (every request as listed "
             "there). Every answer is JSON `{\"error\": ...}` with the status shown; none is a 500 or a traceback.",
             "", f"All clean: {'yes' if all(r['clean'] for r in rows) else 'NO'} ({len(rows)} requests).", "",
             "| request | HTTP status | JSON message |", "|---|---|---|"]
    for r in rows:
        message = r["message"].replace("|", "\\|")
        lines.append(f"| {r['request']} | {r['status']} | {message} |")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    sys.exit(0 if all(r["clean"] for r in rows) else 1)


if __name__ == "__main__":
    main()

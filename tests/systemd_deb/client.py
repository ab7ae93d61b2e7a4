"""A Dovecot auth-client inside the test container (Debian's python3, stdlib only).

    python3 client.py SOCKET TOKENFILE USER                  one authentication
    python3 client.py SOCKET TOKENFILE USER --until STOPFILE  authenticate again and
        again (a new connection each time) until STOPFILE exists

Prints one JSON object: {"ok": N, "fail": N, "refused": N, "dropped": N, ...}.
"refused": the connection itself failed (no socket, refused); "dropped": it
was accepted, then closed before the answer. Postfix reports both as a
temporary failure (454).
"""

from __future__ import annotations

import base64
import json
import os
import socket
import sys


def authenticate(path: str, token: str, user: str, timeout: float = 15.0) -> str:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
        sock.sendall(b"VERSION\t1\t2\nCPID\t4242\n")
        received = b""
        while b"\nDONE\n" not in b"\n" + received:
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionResetError("closed during the handshake")
            received += chunk
        payload = f"n,a={user},\x01auth=Bearer {token}\x01\x01".encode()
        resp = base64.b64encode(payload).decode()
        sock.sendall(f"AUTH\t1\tOAUTHBEARER\tservice=smtp\tresp={resp}\n".encode())
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionResetError("closed before the reply")
            reply += chunk
        return reply.decode().strip()
    finally:
        sock.close()


def main(argv: list[str]) -> int:
    path, token_file, user = argv[1:4]
    stop = argv[5] if len(argv) > 5 and argv[4] == "--until" else None
    with open(token_file) as f:
        token = f.read().strip()
    counts: dict[str, object] = {
        "ok": 0,
        "fail": 0,
        "refused": 0,
        "dropped": 0,
        "errors": [],
        "replies": [],
    }
    while True:
        try:
            reply = authenticate(path, token, user)
        except (ConnectionRefusedError, FileNotFoundError) as exc:
            counts["refused"] = int(counts["refused"]) + 1  # type: ignore[call-overload]
            counts["errors"].append(repr(exc))  # type: ignore[attr-defined]
        except ConnectionResetError as exc:
            counts["dropped"] = int(counts["dropped"]) + 1  # type: ignore[call-overload]
            counts["errors"].append(repr(exc))  # type: ignore[attr-defined]
        except OSError as exc:
            counts["fail"] = int(counts["fail"]) + 1  # type: ignore[call-overload]
            counts["errors"].append(repr(exc))  # type: ignore[attr-defined]
        else:
            key = "ok" if reply.startswith("OK\t1\t") else "fail"
            counts[key] = int(counts[key]) + 1  # type: ignore[call-overload]
            if reply not in counts["replies"]:  # type: ignore[operator]
                counts["replies"].append(reply)  # type: ignore[attr-defined]
        if stop is None or os.path.exists(stop):
            break
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))

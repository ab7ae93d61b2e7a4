"""A peer in a network namespace of its own, reached through a loopback forwarder.

Debian's stock Postfix master.cf listens on port 25 (``smtp inet``), and the
tests must run it unchanged. Port 25 on the host's loopback may be taken (a
system MTA, another test run), and Postfix refuses an ``inet_interfaces``
address that no interface has. So the stock instance runs in a fresh network
namespace (``unshare --net``, loopback up), where 127.0.0.1:25 is always
free, and :class:`Forwarder` relays a free host loopback port to it: every
client (smtplib, curl) connects to ``127.0.0.1:<forwarder port>`` as usual.

Unix sockets named by a path are not bound to a network namespace, so the
peer still reaches the daemon's auth socket; the daemon and the development
issuer stay in the host's namespace. Root is needed (``unshare --net``,
``setns``); the namespace goes away with the last process in it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import selectors
import shutil
import socket
import threading
import time

__all__ = ["NETNS_PREFIX", "Forwarder", "netns_available", "wait_for_netns"]

CLONE_NEWNET = 0x40000000

#: Put before a command to run it in a new network namespace with loopback up.
NETNS_PREFIX = ["unshare", "--net", "--", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"]


def netns_available() -> str | None:
    for tool, package in (("unshare", "util-linux"), ("ip", "iproute2")):
        if shutil.which(tool) is None:
            return f"{tool} not found (install {package!r})"
    if os.geteuid() != 0:
        return "a network namespace of its own needs root"
    return None


def wait_for_netns(pid: int, timeout: float = 10.0) -> int:
    """An open descriptor of ``pid``'s network namespace, once it differs from ours."""
    ours = os.readlink("/proc/self/ns/net")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.readlink(f"/proc/{pid}/ns/net") != ours:
                return os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise RuntimeError(f"process {pid} exited before entering its namespace") from None
        time.sleep(0.02)
    raise RuntimeError(f"process {pid} did not enter a network namespace within {timeout:.0f}s")


def socket_in_netns(ns_fd: int) -> socket.socket:
    """A TCP socket created inside the namespace ``ns_fd`` (by a thread that enters it)."""
    result: list[socket.socket | BaseException] = []

    def run() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        try:
            if libc.setns(ns_fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns: {os.strerror(err)}")
            result.append(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        except BaseException as exc:  # handed to the caller
            result.append(exc)

    # setns() changes only the calling thread, which ends right after.
    t = threading.Thread(target=run, name="netns-socket")
    t.start()
    t.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


class Forwarder:
    """``127.0.0.1:<port>`` in our namespace relayed to ``target`` inside ``ns_fd``'s."""

    def __init__(self, ns_fd: int, target: tuple[str, int]) -> None:
        self.ns_fd = ns_fd
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.host, self.port = self._listener.getsockname()[:2]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._serve, name="netns-forwarder", daemon=True)
        self._accept.start()

    def _serve(self) -> None:
        self._listener.settimeout(0.2)
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            t = threading.Thread(target=self._relay, args=(client,), daemon=True)
            t.start()
            self._threads = [x for x in self._threads if x.is_alive()] + [t]

    def _relay(self, client: socket.socket) -> None:
        with contextlib.ExitStack() as stack:
            stack.enter_context(client)
            try:
                upstream = socket_in_netns(self.ns_fd)
                stack.enter_context(upstream)
                upstream.connect(self.target)
            except OSError:
                return  # the client sees the connection close, as with nothing listening
            sel = selectors.DefaultSelector()
            stack.callback(sel.close)
            sel.register(client, selectors.EVENT_READ, upstream)
            sel.register(upstream, selectors.EVENT_READ, client)
            open_ends = 2
            while open_ends and not self._stop.is_set():
                for key, _ in sel.select(timeout=0.2):
                    src = key.fileobj
                    dst = key.data
                    assert isinstance(src, socket.socket) and isinstance(dst, socket.socket)
                    try:
                        data = src.recv(65536)
                    except OSError:
                        data = b""
                    if data:
                        with contextlib.suppress(OSError):
                            dst.sendall(data)
                        continue
                    sel.unregister(src)
                    open_ends -= 1
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        self._accept.join(timeout=5)
        for t in self._threads:
            t.join(timeout=5)

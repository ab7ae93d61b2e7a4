"""A minimal Dovecot auth-protocol client for tests: send lines, read lines, handshake.

It speaks like Postfix does (one request at a time on one connection) and
treats a closed connection as a test failure.
"""

from __future__ import annotations

import trio


class LineClient:
    def __init__(self, stream: trio.SocketStream, *, timeout: float = 10.0) -> None:
        self.stream = stream
        self.buffer = b""
        self.timeout = timeout

    @classmethod
    async def connect(cls, path: str) -> LineClient:
        return cls(await trio.open_unix_socket(path))

    async def send(self, line: str | bytes) -> None:
        data = line if isinstance(line, bytes) else line.encode()
        await self.stream.send_all(data + b"\n")

    async def line(self) -> str:
        with trio.fail_after(self.timeout):
            while b"\n" not in self.buffer:
                chunk = await self.stream.receive_some(65536)
                assert chunk, "daemon closed the connection"
                self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode()

    async def handshake(self) -> list[str]:
        """Send VERSION and CPID; return the server's handshake lines up to DONE."""
        await self.send("VERSION\t1\t2\nCPID\t4242")
        lines = []
        while (line := await self.line()) != "DONE":
            lines.append(line)
        return lines

"""The accept loop every socket frontend shares: bounded, and resilient to running out.

At most ``max_connections`` connections are served at once (further ones wait
in the kernel's backlog). An ``accept`` that fails because the process or the
system is out of file descriptors or memory is logged (``accept_failed``) and
retried after a short pause instead of ending the listener.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
import trio

log = structlog.get_logger("saslauthd_oidc.accept")

# accept() errors that mean "out of resources right now", not "listener broken".
ACCEPT_RETRY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
ACCEPT_RETRY_DELAY = 0.1


async def serve_connections(
    listener: trio.abc.Listener[Any],
    serve_one: Callable[[Any], Awaitable[None]],
    *,
    max_connections: int,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept forever; run ``serve_one(stream)`` in its own task for each connection."""
    slots = trio.Semaphore(max_connections)

    async def one(stream: Any) -> None:
        try:
            await serve_one(stream)
        finally:
            slots.release()

    async with trio.open_nursery() as nursery:
        task_status.started()
        while True:
            await slots.acquire()
            try:
                stream = await listener.accept()
            except OSError as exc:
                slots.release()
                if exc.errno not in ACCEPT_RETRY_ERRNOS:
                    raise
                log.warning("accept_failed", error=os.strerror(exc.errno or 0))
                await trio.sleep(ACCEPT_RETRY_DELAY)
                continue
            nursery.start_soon(one, stream)

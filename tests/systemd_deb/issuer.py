"""A development issuer inside the test container: run with the package's venv python.

    /opt/venvs/saslauthd-oidc/bin/python issuer.py PORT TOKENFILE

Serves discovery and JWKS on 127.0.0.1:PORT (the container has no network)
and writes a fresh access token (aud "mail", email alice@example.org) to
TOKENFILE once it listens.
"""

from __future__ import annotations

import os
import sys
from functools import partial

import trio

from saslauthd_oidc.tools.devissuer import DevIssuer


async def main(port: int, token_file: str) -> None:
    issuer = DevIssuer()
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(issuer.serve, "127.0.0.1", port))
        partial_path = token_file + ".new"
        with open(partial_path, "w") as f:
            f.write(issuer.mint(lifetime=3600))
        os.replace(partial_path, token_file)


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]), sys.argv[2])

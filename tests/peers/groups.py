"""The socket clients' group, as the Debian package's postinst makes it.

The shipped socket units give their sockets to ``saslauthd-oidc-clients``
(not the daemon's own group, which may read secret files); postinst creates
it and adds ``postfix``, ``Debian-exim`` and ``cyrus`` when they exist.
Peer tests that use the shipped units' group call :func:`ensure_client_group`
so that a machine without the package looks like one with it (``.ci/run``
does the same up front).
"""

from __future__ import annotations

import grp
import os
import pwd
import subprocess

CLIENT_GROUP = "saslauthd-oidc-clients"
CLIENT_USERS = ("postfix", "Debian-exim", "cyrus")


def ensure_client_group() -> str | None:
    """Create the group and add the mail servers' users; None when that is not possible here."""
    try:
        grp.getgrnam(CLIENT_GROUP)
    except KeyError:
        if os.geteuid() != 0:
            return f"group {CLIENT_GROUP} is missing and only root can create it"
        subprocess.run(["groupadd", "--system", CLIENT_GROUP], check=True)
    members = set(grp.getgrnam(CLIENT_GROUP).gr_mem)
    for user in CLIENT_USERS:
        try:
            pwd.getpwnam(user)
        except KeyError:
            continue
        if user not in members:
            if os.geteuid() != 0:
                return f"{user} is not in group {CLIENT_GROUP} and only root can add it"
            subprocess.run(["gpasswd", "-a", user, CLIENT_GROUP], check=True, capture_output=True)
    return None

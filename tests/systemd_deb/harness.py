"""Build the .deb, an OS tree, and boot it under a real systemd (PID 1) in systemd-nspawn.

* :func:`build_debs` builds ``saslauthd-oidc_<version>_<arch>.deb`` with
  ``dpkg-buildpackage -us -uc -b`` from a copy of this checkout, twice: the
  checkout's version and a "previous" one (``<version>~prev1``) for the
  upgrade test. Cached under :data:`CACHE` by a hash of the inputs (the
  files that go into the package), so several tests and runs share a build.
* :func:`os_tree` is a ``mmdebstrap --variant=minbase bookworm`` tree with
  systemd, systemd-sysv, dbus, python3 (the venv's interpreter), adduser and
  man-db, cached as a tarball named by the hash of that package list.
* :class:`Container` boots the tree with ``systemd-nspawn -b
  --volatile=overlay`` (every boot starts from the pristine tree) in a
  cgroup of its own, with no network; ``run`` executes a command inside with
  ``nsenter``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("SASLAUTHD_OIDC_TEST_CACHE", "/var/cache/saslauthd-oidc-tests"))
TREE_PACKAGES = ("adduser", "dbus", "man-db", "python3", "systemd", "systemd-sysv")
SUITE = "bookworm"
# What goes into the package: a change to any of these rebuilds it.
DEB_INPUTS = (
    "LICENSE",
    "MANIFEST.in",
    "README.md",
    "pyproject.toml",
    "setup.py",
    "contrib",
    "debian",
    "docs",
    "etc",
    "saslauthd_oidc",
)
BUILD_TOOLS = {
    "dpkg-buildpackage": "dpkg-dev",
    "dh_virtualenv": "dh-virtualenv",
    "dh": "debhelper",
    "mmdebstrap": "mmdebstrap",
    "systemd-nspawn": "systemd-container",
    "nsenter": "util-linux",
}
CONTAINER_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def unavailable() -> str | None:
    """Why these tests cannot run here (None: they can)."""
    if os.geteuid() != 0:
        return "needs root (systemd-nspawn, mmdebstrap)"
    missing = [pkg for tool, pkg in BUILD_TOOLS.items() if shutil.which(tool) is None]
    if missing:
        return "missing Debian packages: " + " ".join(sorted(set(missing)))
    if (
        not Path("/sys/fs/cgroup/unified").is_dir()
        and not Path("/sys/fs/cgroup/cgroup.controllers").exists()
    ):
        return "no cgroup v2 hierarchy for the container"
    return None


# --------------------------------------------------------------------------- the .deb


def _input_files() -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "--", *DEB_INPUTS],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    return sorted(ROOT / p for p in listed if (ROOT / p).is_file())


def deb_inputs_hash() -> str:
    digest = hashlib.sha256()
    for path in _input_files():
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def checkout_version() -> str:
    first = (ROOT / "debian" / "changelog").read_text().splitlines()[0]
    return first.split("(", 1)[1].split(")", 1)[0]


@dataclass(frozen=True)
class Debs:
    current: Path
    previous: Path
    version: str
    previous_version: str


def _copy_inputs(dest: Path) -> None:
    for path in _input_files():
        target = dest / path.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)


def _set_version(src: Path, version: str) -> None:
    """The top changelog entry's version (the previous build: older than the checkout's)."""
    changelog = src / "debian" / "changelog"
    head, rest = changelog.read_text().split("\n", 1)
    changelog.write_text(head.replace(f"({checkout_version()})", f"({version})") + "\n" + rest)


STALE_BUILD_AGE = 24 * 3600.0


def _older_than(path: Path, seconds: float) -> bool:
    try:
        return time.time() - path.stat().st_mtime > seconds
    except OSError:
        return False


def build_debs(log: Path) -> Debs:
    """Both packages, from the cache when the inputs are unchanged (two builds at once)."""
    version = checkout_version()
    previous = f"{version}~prev1"
    out = CACHE / f"deb-{deb_inputs_hash()}"
    arch = subprocess.run(
        ["dpkg", "--print-architecture"], capture_output=True, text=True, check=True
    ).stdout.strip()
    debs = Debs(
        current=out / f"saslauthd-oidc_{version}_{arch}.deb",
        previous=out / f"saslauthd-oidc_{previous}_{arch}.deb",
        version=version,
        previous_version=previous,
    )
    if debs.current.exists() and debs.previous.exists():
        return debs
    work = out.with_name(out.name + f".build-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    builds: list[tuple[subprocess.Popen[bytes], Path, Path]] = []
    env = {**os.environ, "DEB_BUILD_OPTIONS": "nocheck", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    for name, ver in (("current", version), ("previous", previous)):
        src = work / name / "src"
        _copy_inputs(src)
        if ver != version:
            _set_version(src, ver)
        logfile = log.with_name(f"{log.name}-{name}.log")
        with logfile.open("wb") as f:
            proc = subprocess.Popen(
                ["dpkg-buildpackage", "-us", "-uc", "-b"], cwd=src, stdout=f, stderr=f, env=env
            )
        builds.append((proc, src, logfile))
    for proc, _, logfile in builds:
        if proc.wait(timeout=600) != 0:
            tail = logfile.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"dpkg-buildpackage failed ({logfile}):\n{tail}")
    # Published whole (a rename), so that a concurrent run never sees half of it.
    staged = work / "debs"
    staged.mkdir()
    for _, src, _ in builds:
        for deb in src.parent.glob("*.deb"):
            shutil.copy2(deb, staged / deb.name)
    with contextlib.suppress(OSError):  # another run published the same inputs first
        staged.rename(out)
    shutil.rmtree(work, ignore_errors=True)
    # Builds of inputs that are gone, once a day old: another checkout on this
    # machine (a parallel worktree) may be using a newer one right now.
    for stale in CACHE.glob("deb-*"):
        if stale != out and ".build-" not in stale.name and _older_than(stale, STALE_BUILD_AGE):
            shutil.rmtree(stale, ignore_errors=True)
    return debs


# --------------------------------------------------------------------------- the OS tree


def tree_tarball() -> Path:
    """The cached minbase tree (built once: about 25 s)."""
    key = hashlib.sha256(f"{SUITE} minbase {','.join(TREE_PACKAGES)}".encode()).hexdigest()[:16]
    tarball = CACHE / f"tree-{key}.tar"
    if tarball.exists():
        return tarball
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = tarball.with_name(tarball.name + f".{os.getpid()}.new")
    subprocess.run(
        [
            "mmdebstrap",
            "--variant=minbase",
            "--include=" + ",".join(TREE_PACKAGES),
            SUITE,
            str(partial),
        ],
        check=True,
        capture_output=True,
        timeout=900,
    )
    partial.replace(tarball)
    return tarball


def os_tree(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tree_tarball()) as tar:
        tar.extractall(dest, numeric_owner=True, filter="fully_trusted")
    return dest


# --------------------------------------------------------------------------- the container


class ContainerError(RuntimeError):
    pass


class Container:
    """A booted systemd-nspawn container; ``run`` executes commands inside it."""

    def __init__(self, tree: Path, share: Path, workdir: Path) -> None:
        self.tree, self.share, self.workdir = tree, share, workdir
        self.name = f"saslauthd-oidc-test-{os.getpid()}-{time.monotonic_ns() % 10**8}"
        self.cgroups = [
            base / self.name
            for base in (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup/systemd"))
            if base.is_dir()
        ]
        self.proc: subprocess.Popen[bytes] | None = None
        self.init_pid = 0
        self.console = workdir / f"{self.name}.console"

    def boot(self, timeout: float = 60) -> None:
        for cg in self.cgroups:
            cg.mkdir()
        # The nspawn process moves itself into its own cgroups first: the
        # host's hierarchy is hybrid, and nspawn needs a cgroup to delegate.
        moves = " ".join(f"echo $$ > {cg}/cgroup.procs;" for cg in self.cgroups)
        command = [
            "systemd-nspawn",
            "-D",
            str(self.tree),
            "-b",
            "--register=no",
            "--keep-unit",
            "--private-network",
            "--volatile=overlay",
            f"--bind-ro={self.share}:/srv/test",
            f"--machine={self.name[-60:]}",
            "--console=pipe",
        ]
        with self.console.open("wb") as console:
            self.proc = subprocess.Popen(
                ["sh", "-c", f'{moves} exec "$@"', "sh", *command],
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=console,
                env={**os.environ, "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"},
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ContainerError(f"systemd-nspawn exited: {self.console.read_text()[-2000:]}")
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
            with contextlib.suppress(OSError):
                pids = children.read_text().split()
                if pids and Path(f"/proc/{pids[0]}/comm").read_text().strip() == "systemd":
                    self.init_pid = int(pids[0])
                    break
            time.sleep(0.1)
        else:
            raise ContainerError("the container's systemd did not start")
        state = ""
        while time.monotonic() < deadline and state not in ("running", "degraded"):
            # Until systemd listens on its private socket, systemctl cannot ask.
            state = self.run(
                "systemctl", "is-system-running", "--wait", check=False, timeout=timeout
            ).stdout.strip()
            if state not in ("running", "degraded"):
                time.sleep(0.2)
        if state not in ("running", "degraded"):
            raise ContainerError(f"the container's systemd is {state!r}")

    def run(
        self,
        *command: str,
        check: bool = True,
        input: str | None = None,
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [
                "nsenter",
                "-t",
                str(self.init_pid),
                "-a",
                "env",
                "-i",
                f"PATH={CONTAINER_PATH}",
                "LANG=C.UTF-8",
                "DEBIAN_FRONTEND=noninteractive",
                *command,
            ],
            capture_output=True,
            text=True,
            input=input,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise ContainerError(
                f"{' '.join(command)} exited {result.returncode}:\n"
                f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            )
        return result

    def sh(self, script: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
        return self.run("sh", "-c", script, **kwargs)  # type: ignore[arg-type]

    def write(self, path: str, text: str) -> None:
        self.run("sh", "-c", 'cat > "$1"', "sh", path, input=text)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.run("systemctl", "show", unit, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def wait_for(
        self, what: str, predicate: object, timeout: float = 30, interval: float = 0.2
    ) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():  # type: ignore[operator]
                return
            time.sleep(interval)
        raise ContainerError(f"timed out waiting for {what}")

    def shutdown(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # nspawn: an orderly halt of the container
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        for cg in self.cgroups:
            for sub in sorted(
                (p for p in cg.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)
            ):
                with contextlib.suppress(OSError):
                    sub.rmdir()
            with contextlib.suppress(OSError):
                cg.rmdir()


@contextlib.contextmanager
def booted(tree: Path, share: Path, workdir: Path) -> Iterator[Container]:
    container = Container(tree, share, workdir)
    try:
        container.boot()
        yield container
    finally:
        container.shutdown()


def journal(container: Container, unit: str, lines: int = 50) -> str:
    return container.run(
        "journalctl", "-u", unit, "--no-pager", "-n", str(lines), "-o", "cat", check=False
    ).stdout


def status(container: Container, unit: str) -> str:
    return container.run(
        "systemctl", "status", unit, "--no-pager", "-n", "15", "--full", check=False
    ).stdout


def apt_install(container: Container, *debs: str) -> subprocess.CompletedProcess[str]:
    return container.run(
        "apt-get",
        "install",
        "-y",
        "--no-install-recommends",
        "-o",
        "Dpkg::Options::=--force-confold",
        *debs,
        timeout=300,
    )

"""Agent hosts with Docker engines of their own (Docker in Docker), several on one machine.

    python compose/hosts.py up N [--prefix P] [--load IMAGE ...] [--network NET]
    python compose/hosts.py load IMAGE ... [--prefix P]
    python compose/hosts.py list [--prefix P]
    python compose/hosts.py down [--prefix P]

A host is a container of the ``host`` image (``compose/images/host``) named ``P-0``, ``P-1``...
Its engine's API is a unix socket in a directory of the outer host (``/tmp/hd-hosts/NAME``),
so an agent started here with ``DOCKER_HOST=unix:///tmp/hd-hosts/NAME/docker.sock`` launches
its runs there. ``up`` removes the hosts of the same prefix first, and prints one line a host:
its name, its engine's URL and the PID of its ``dockerd`` as this machine sees it (SIGSTOP
freezes that engine, SIGCONT resumes it). Images reach the engines by ``docker save`` from the
outer engine, saved once and loaded into every host. ``--network`` attaches the hosts to a
network of the outer engine (say, a compose stack's), so that what runs on a host with the
host's network (``network_mode=host`` on its engine) reaches that network's services by name.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import docker
import docker.errors
import requests
from docker.models.containers import Container

from dispatcher.settings import ImageNames

#: Every host and its volume carries this label; its value is the hosts' prefix.
HOST_LABEL = "hybrid-dispatcher.host"
#: The PID of the process that owns a host (a test session); gone means the host is left over.
OWNER_LABEL = "hybrid-dispatcher.host.owner"
SOCKETS = Path("/tmp/hd-hosts")
#: Where the image's entry point puts the engine's socket, inside the host.
SOCKET_MOUNT = "/run/hd-host"
DATA_ROOT = "/var/lib/docker"
# Not --privileged: an outer engine that itself runs without some capabilities cannot grant
# them all (runc: "unable to apply caps"). What an inner dockerd needs: mounts and cgroups
# (SYS_ADMIN), network namespaces (NET_ADMIN, NET_RAW), device nodes (MKNOD), runc's view of
# its children (SYS_PTRACE), and no seccomp or AppArmor profile in the way of its mounts.
CAPABILITIES = ("SYS_ADMIN", "NET_ADMIN", "MKNOD", "SYS_PTRACE", "NET_RAW")
SECURITY_OPT = ("seccomp=unconfined", "apparmor=unconfined")
DEVICE_CGROUP_RULES = ("a *:* rwm",)


class HostError(Exception):
    """A host could not be started, reached or loaded; the message says why."""


class Host:
    """One running host: its container, its engine's URL and its dockerd's PID."""

    def __init__(self, name: str, container_id: str, socket_dir: Path, dockerd_pid: int) -> None:
        self.name = name
        self.container_id = container_id
        self.socket_dir = socket_dir
        self.docker_url = f"unix://{socket_dir}/docker.sock"
        #: As this machine sees it: ``os.kill(dockerd_pid, SIGSTOP)`` freezes the engine.
        self.dockerd_pid = dockerd_pid
        self._client: docker.DockerClient | None = None

    def __repr__(self) -> str:
        return f"Host({self.name!r}, {self.docker_url!r}, dockerd_pid={self.dockerd_pid})"

    @property
    def client(self) -> docker.DockerClient:
        """A client of this host's engine (made once, closed by ``close()``)."""
        if self._client is None:
            self._client = docker.DockerClient(base_url=self.docker_url, timeout=120)
        return self._client

    def answers(self, timeout: float = 2.0) -> bool:
        """Whether the engine answers a ping within ``timeout`` seconds."""
        probe = None
        try:
            # The client asks the engine for its API version as it is made.
            probe = docker.DockerClient(base_url=self.docker_url, timeout=timeout)
            return bool(probe.ping())
        except (docker.errors.DockerException, requests.RequestException):
            return False
        finally:
            if probe is not None:
                probe.close()

    def freeze(self) -> None:
        """Stop the engine's dockerd (SIGSTOP): its API no longer answers, its containers run."""
        os.kill(self.dockerd_pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.dockerd_pid, signal.SIGCONT)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def up(
    outer: docker.DockerClient,
    count: int,
    prefix: str = "hd-host",
    image: str | None = None,
    labels: Mapping[str, str] | None = None,
    images: Iterable[str] = (),
    owner: int | None = None,
    timeout: float = 60.0,
    network: str | None = None,
) -> list[Host]:
    """Start ``count`` hosts named ``prefix-0``... (removing any of that prefix first), wait
    until every engine answers and load ``images`` into them; on any failure, remove them all.
    ``owner``: a PID whose end makes the hosts leftovers (see ``remove_leftovers``).
    ``network``: a network of the outer engine the hosts join instead of its default bridge."""
    image = image or ImageNames.from_env().host
    if network is not None:
        try:
            outer.networks.get(network)
        except docker.errors.NotFound as exc:
            raise HostError(f"network {network} of the outer engine is missing") from exc
    down(outer, prefix)
    all_labels = {**(labels or {}), HOST_LABEL: prefix}
    if owner is not None:
        all_labels[OWNER_LABEL] = str(owner)
    started = []
    try:
        for n in range(count):
            started.append(_start(outer, f"{prefix}-{n}", image, all_labels, network))
        hosts = [_ready(outer, container, timeout) for container in started]
        if images:
            load(outer, hosts, images)
        return hosts
    except BaseException:
        down(outer, prefix)
        raise


def _start(
    outer: docker.DockerClient,
    name: str,
    image: str,
    labels: dict[str, str],
    network: str | None = None,
) -> str:
    socket_dir = SOCKETS / name
    socket_dir.mkdir(parents=True, exist_ok=True)
    try:
        volume = outer.volumes.create(f"{name}-data", labels=labels)
        container = outer.containers.run(
            image,
            name=name,
            hostname=name,
            detach=True,
            labels=labels,
            cap_add=list(CAPABILITIES),
            security_opt=list(SECURITY_OPT),
            device_cgroup_rules=list(DEVICE_CGROUP_RULES),
            # Joined at creation, not later: the host's resolv.conf then points at the outer
            # engine's DNS, which its own engine hands on to host-network containers.
            network=network,
            environment={"HD_HOST_SOCKET_GID": str(_outer_socket_gid())},
            volumes={
                str(socket_dir): {"bind": SOCKET_MOUNT, "mode": "rw"},
                volume.name: {"bind": DATA_ROOT, "mode": "rw"},
            },
        )
    except docker.errors.ImageNotFound as exc:
        raise HostError(f"image {image} is missing: run `make images`") from exc
    except docker.errors.APIError as exc:
        raise HostError(
            f"the outer engine refused host {name} (capabilities {', '.join(CAPABILITIES)}, "
            f"{', '.join(SECURITY_OPT)}, device rule {DEVICE_CGROUP_RULES[0]!r}): "
            f"{exc.explanation or exc}"
        ) from exc
    return str(container.id)


def _ready(outer: docker.DockerClient, container_id: str, timeout: float) -> Host:
    container = outer.containers.get(container_id)
    host = Host(container.name, container_id, SOCKETS / container.name, dockerd_pid=0)
    deadline = time.monotonic() + timeout
    while not host.answers():
        container.reload()
        if container.status != "running" or time.monotonic() > deadline:
            tail = container.logs(tail=15).decode(errors="replace").strip()
            state = "exited" if container.status != "running" else f"silent for {timeout:.0f} s"
            raise HostError(
                f"the engine of host {host.name} {state} (it needs the capabilities "
                f"{', '.join(CAPABILITIES)}, {' and '.join(SECURITY_OPT)}); "
                f"its last output:\n{tail}"
            )
        time.sleep(0.1)
    host.dockerd_pid = _dockerd_pid(container)
    return host


def _dockerd_pid(container: Container) -> int:
    top = container.top()
    pid_at, cmd_at = top["Titles"].index("PID"), top["Titles"].index("CMD")
    for row in top["Processes"]:
        if Path(row[cmd_at].split()[0]).name == "dockerd":
            pid = int(row[pid_at])
            # The PID is the outer engine's; it means something here only in the same namespace.
            comm = Path(f"/proc/{pid}/comm")
            if not comm.exists() or comm.read_text().strip() != "dockerd":
                raise HostError(
                    f"dockerd of {container.name} is PID {pid} to the outer engine, but not to "
                    "this process: is the outer engine on another machine or PID namespace?"
                )
            return pid
    raise HostError(f"no dockerd runs in host {container.name}")


def find(outer: docker.DockerClient, prefix: str | None = None) -> list[Host]:
    """The running hosts (of ``prefix``, or all), by name."""
    label = f"{HOST_LABEL}={prefix}" if prefix else HOST_LABEL
    containers = outer.containers.list(filters={"label": label}, ignore_removed=True)
    return [
        Host(c.name, str(c.id), SOCKETS / c.name, _dockerd_pid(c))
        for c in sorted(containers, key=lambda c: c.name)
    ]


def down(outer: docker.DockerClient, prefix: str | None = None) -> list[str]:
    """Remove the hosts (of ``prefix``, or all), their volumes and sockets; their names."""
    label = f"{HOST_LABEL}={prefix}" if prefix else HOST_LABEL
    return _remove(outer, {"label": label})


def remove_leftovers(outer: docker.DockerClient) -> list[str]:
    """Remove the hosts whose owner process has ended (a test session that was killed)."""
    removed = []
    for container in outer.containers.list(
        all=True, filters={"label": OWNER_LABEL}, ignore_removed=True
    ):
        if not Path(f"/proc/{container.labels[OWNER_LABEL]}").exists():
            removed += down(outer, container.labels[HOST_LABEL])
    return removed


def _remove(outer: docker.DockerClient, filters: dict[str, str]) -> list[str]:
    names = []
    for container in outer.containers.list(all=True, filters=filters, ignore_removed=True):
        # SIGKILL reaches a stopped dockerd too: a frozen host goes like any other.
        with contextlib.suppress(docker.errors.NotFound):
            container.remove(force=True, v=True)
        shutil.rmtree(SOCKETS / container.name, ignore_errors=True)
        names.append(container.name)
    for volume in outer.volumes.list(filters=filters):
        with contextlib.suppress(docker.errors.NotFound):
            volume.remove(force=True)
    return names


def load(outer: docker.DockerClient, hosts: Iterable[Host], images: Iterable[str]) -> None:
    """Put ``images`` of the outer engine into every host: each saved once, loaded in parallel."""
    hosts = list(hosts)
    with tempfile.TemporaryDirectory(prefix="hd-hosts-") as tmp:
        tarballs = []
        for n, name in enumerate(images):
            try:
                image = outer.images.get(name)
            except docker.errors.ImageNotFound as exc:
                raise HostError(f"image {name} is not in the outer engine") from exc
            tarball = Path(tmp) / f"{n}.tar"
            with tarball.open("wb") as out:
                for chunk in image.save(named=True):
                    out.write(chunk)
            tarballs.append(tarball)

        def load_into(host: Host) -> None:
            for tarball in tarballs:
                with tarball.open("rb") as data:
                    try:
                        host.client.images.load(data)
                    except (docker.errors.DockerException, requests.RequestException) as exc:
                        raise HostError(f"loading into {host.name} failed: {exc}") from exc

        with ThreadPoolExecutor(max_workers=max(1, len(hosts))) as pool:
            for done in [pool.submit(load_into, host) for host in hosts]:
                done.result()


def _outer_socket_gid() -> int:
    """The group of the outer engine's socket, given to the inner ones: whoever may use the
    outer engine may use them."""
    socket = Path(os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock").split("://")[-1])
    return socket.stat().st_gid if socket.is_socket() else os.getgid()


# ------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("up", help="start N hosts (removing those of the prefix first)")
    start.add_argument("count", type=int, metavar="N")
    start.add_argument("--load", nargs="+", default=[], metavar="IMAGE", help="images to load")
    start.add_argument("--network", metavar="NET", help="a network of the outer engine to join")
    put = commands.add_parser("load", help="load images of the outer engine into the hosts")
    put.add_argument("images", nargs="+", metavar="IMAGE")
    commands.add_parser("list", help="the running hosts")
    commands.add_parser("down", help="remove the hosts, their volumes and sockets")
    for command in commands.choices.values():
        command.add_argument("--prefix", default="hd-host", help="host names' prefix")
    args = parser.parse_args(argv)
    try:
        outer = docker.from_env(timeout=600)
        outer.ping()
        _command(outer, args)
    except docker.errors.DockerException as exc:
        print(f"[hosts] error: the outer Docker engine: {exc}", file=sys.stderr)
        return 1
    except HostError as exc:
        print(f"[hosts] error: {exc}", file=sys.stderr)
        return 1
    return 0


def _command(outer: docker.DockerClient, args: argparse.Namespace) -> None:
    began = time.monotonic()
    if args.command == "down":
        for name in down(outer, args.prefix):
            print(f"[hosts] removed {name}", file=sys.stderr)
        return
    if args.command == "up":
        hosts = up(outer, args.count, args.prefix, images=args.load, network=args.network)
        print(f"[hosts] {len(hosts)} up in {time.monotonic() - began:.1f} s", file=sys.stderr)
    else:
        hosts = find(outer, args.prefix)
    if args.command == "load":
        if not hosts:
            raise HostError(f"no host of prefix {args.prefix} runs")
        load(outer, hosts, args.images)
        print(f"[hosts] loaded in {time.monotonic() - began:.1f} s", file=sys.stderr)
    for host in hosts:
        print(f"{host.name}\t{host.docker_url}\t{host.dockerd_pid}")


if __name__ == "__main__":
    sys.exit(main())

"""Build every image the project needs, with no container registry reachable.

    python compose/images/build.py [--force] [NAME ...]

NAME is any of: base, rabbitmq, postgres, app, agent, run-tiny, example-location, host (default:
all, in that order).

``app`` holds every role (``hybrid-dispatcher[agent,control-plane,web]``); ``agent`` only the
agent's (``hybrid-dispatcher[agent]``: no asyncpg). Both are installed from one wheelhouse of the
project and all its extras, built once per run.

Each image carries a label with a hash of its inputs (its recipe, the base image it is
built on and, for the project's image, the project's sources). An image whose label
matches is not rebuilt, so a second run takes seconds. Image names come from
``ImageNames.from_env()``; a name changed from its default
(say ``HD_IMAGE_POSTGRES=postgres:15``) is taken as an image the user provides: it is used as it
is, pulled if absent, never built.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import docker
import docker.errors
from docker.models.images import Image

from dispatcher.settings import ImageNames

RECIPES = Path(__file__).resolve().parent
ROOT = RECIPES.parent.parent
HASH_LABEL = "hybrid-dispatcher.inputs-hash"
SUITE = "bookworm"
# Bump when the way the base root file system is made changes.
BASE_RECIPE_VERSION = "3"
ORDER = ("base", "rabbitmq", "postgres", "app", "agent", "run-tiny", "example-location", "host")
PROJECT_SOURCES = (
    "pyproject.toml",
    "schemas",
    "transport",
    "dispatcher",
    "worker_agent",
    "sdk/hd_sdk",
)
EXAMPLE_SOURCES = ("sdk", "examples/hello_location")
#: The project with every extra: the wheelhouse then holds what any role installs.
PROJECT_WHEELS = f"{ROOT}[agent,control-plane,web]"
#: Images installed from a wheelhouse made on the host, and what the wheels are built from
#: (a pip requirement: a path, with extras). Images naming the same one share it.
WHEELS = {"app": PROJECT_WHEELS, "agent": PROJECT_WHEELS, "example-location": str(ROOT / "sdk")}


class BuildError(Exception):
    """An image could not be built; the message says why."""


def log(message: str) -> None:
    print(f"[images] {message}", flush=True)


# ---------------------------------------------------------------------------- hashing


def _walk(paths: Iterable[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            for child in sorted(path.rglob("*")):
                if child.is_file() and "__pycache__" not in child.parts:
                    yield child
        elif path.is_file():
            yield path


def inputs_hash(*parts: str, files: Iterable[Path] = ()) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode() + b"\0")
    for path in _walk(files):
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:32]


def current_hash(client: docker.DockerClient, tag: str) -> str | None:
    try:
        image: Image = client.images.get(tag)
    except docker.errors.ImageNotFound:
        return None
    return (image.labels or {}).get(HASH_LABEL)


# ------------------------------------------------------------------ the Debian mirror


def debian_mirrors() -> list[tuple[str, list[str]]]:
    """(URI, suites) of the Debian archives this machine's apt uses, plain HTTP only.

    Containers cannot verify TLS certificates that the host trusts, so only http://
    sources are kept; apt checks package signatures either way.
    """
    found: list[tuple[str, list[str]]] = []
    for path in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for stanza in path.read_text().split("\n\n"):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if ":" in line and not line.startswith(("#", " ")):
                    key, _, value = line.partition(":")
                    fields[key.strip().lower()] = value.strip()
            for uri in fields.get("uris", "").split():
                found.append((uri, fields.get("suites", "").split()))
    sources_list = Path("/etc/apt/sources.list")
    if sources_list.exists():
        for line in sources_list.read_text().splitlines():
            match = re.match(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", line.strip())
            if match:
                found.append((match.group(1), [match.group(2)]))
    return [
        (uri.rstrip("/"), suites)
        for uri, suites in found
        if uri.startswith("http://") and any(s.startswith(SUITE) for s in suites)
    ]


# -------------------------------------------------------------------------- builders


def build_base(client: docker.DockerClient, tag: str, force: bool) -> None:
    mirrors = debian_mirrors()
    wanted = inputs_hash(BASE_RECIPE_VERSION, SUITE, repr(mirrors))
    if not force and current_hash(client, tag) == wanted:
        log(f"base {tag}: up to date")
        return
    if _try_pull_base(client, tag, wanted):
        return
    main = [uri for uri, suites in mirrors if SUITE in suites]
    if not main:
        raise BuildError(
            "no registry answers and no plain-HTTP Debian mirror for "
            f"'{SUITE}' is configured in /etc/apt/sources.list(.d); cannot make a base image"
        )
    if shutil.which("debootstrap") is None:
        raise BuildError("debootstrap is not installed: apt-get install -y debootstrap")
    log(f"base {tag}: no registry answers; debootstrap {SUITE} from {main[0]} (about a minute)")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="hd-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        _run(["debootstrap", "--variant=minbase", SUITE, str(rootfs), main[0]])
        _configure_rootfs(rootfs, mirrors)
        tarball = Path(tmp) / "rootfs.tar"
        _run(["tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(tarball), "."])
        repository, _, version = tag.rpartition(":")
        client.api.import_image_from_file(
            str(tarball),
            repository=repository,
            tag=version,
            changes=[
                f"LABEL {HASH_LABEL}={wanted}",
                'CMD ["/bin/bash"]',
                "ENV LANG=C.UTF-8",
            ],
        )
    log(f"base {tag}: built in {time.monotonic() - started:.0f} s")


def _try_pull_base(client: docker.DockerClient, tag: str, wanted: str) -> bool:
    """Use debian:bookworm-slim when a registry answers; False when none does."""
    try:
        client.images.pull("debian", f"{SUITE}-slim")
    except docker.errors.APIError:
        return False
    log(f"base {tag}: pulled debian:{SUITE}-slim")
    _docker_build(
        client,
        RECIPES / "base-from-registry",
        tag,
        {"SOURCE_IMAGE": f"debian:{SUITE}-slim"},
        wanted,
    )
    return True


def _configure_rootfs(rootfs: Path, mirrors: list[tuple[str, list[str]]]) -> None:
    (rootfs / "etc/apt/sources.list").write_text(
        "".join(f"deb {uri} {suite} main\n" for uri, suites in mirrors for suite in suites)
    )
    # Packages must not start services while an image is being built.
    policy = rootfs / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    (rootfs / "etc/apt/apt.conf.d/90hybrid-dispatcher").write_text(
        'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\nAcquire::Retries "3";\n'
    )
    for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for entry in (rootfs / cache).glob("*"):
            if entry.is_file():
                entry.unlink()


class Wheelhouses:
    """Wheelhouses built on the host (``pip wheel``), one per requirement, once per run."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._built: dict[str, Path] = {}

    def get(self, requirement: str) -> Path:
        if requirement not in self._built:
            target = self.root / f"wheelhouse-{len(self._built)}"
            shown = requirement.replace(str(ROOT), ".")
            log(f"building the wheelhouse of {shown} on the host (pip wheel)")
            _run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "wheel",
                    "--quiet",
                    "--wheel-dir",
                    str(target),
                    requirement,
                ]
            )
            self._built[requirement] = target
        return self._built[requirement]


def build_recipe(
    client: docker.DockerClient,
    name: str,
    tag: str,
    base_tag: str,
    force: bool,
    wheelhouses: Wheelhouses,
    extra_inputs: tuple[Path, ...] = (),
) -> None:
    recipe = RECIPES / name
    base_id = client.images.get(base_tag).id
    wanted = inputs_hash(name, base_id, files=(recipe, *extra_inputs))
    if not force and current_hash(client, tag) == wanted:
        log(f"{name} {tag}: up to date")
        return
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"hd-{name}-") as tmp:
        context = Path(tmp) / "context"
        shutil.copytree(recipe, context)
        if name in WHEELS:
            shutil.copytree(wheelhouses.get(WHEELS[name]), context / "wheelhouse")
        if name == "example-location":
            shutil.copytree(ROOT / "examples" / "hello_location", context / "hello_location")
        log(f"{name} {tag}: building")
        _docker_build(client, context, tag, {"BASE_IMAGE": base_tag}, wanted)
    log(f"{name} {tag}: built in {time.monotonic() - started:.0f} s")


def _docker_build(
    client: docker.DockerClient, context: Path, tag: str, args: dict[str, str], wanted: str
) -> None:
    recent: list[str] = []
    for chunk in client.api.build(
        path=str(context),
        tag=tag,
        buildargs=args,
        labels={HASH_LABEL: wanted},
        rm=True,
        forcerm=True,
        pull=False,
        decode=True,
    ):
        if "error" in chunk:
            tail = "".join(recent[-30:])
            raise BuildError(f"docker build of {tag} failed: {chunk['error'].strip()}\n{tail}")
        text = chunk.get("stream", "")
        if text:
            recent.append(text)
            if text.startswith("Step "):
                log(f"  {text.strip()}")


def use_provided(client: docker.DockerClient, tag: str) -> None:
    try:
        client.images.get(tag)
        log(f"{tag}: provided by the user, present")
    except docker.errors.ImageNotFound:
        log(f"{tag}: provided by the user, pulling")
        try:
            client.images.pull(tag)
        except docker.errors.APIError as exc:
            raise BuildError(f"cannot pull {tag}: {exc.explanation or exc}") from exc


def _run(cmd: list[str]) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        output = (result.stdout + result.stderr)[-4000:]
        raise BuildError(f"{' '.join(cmd[:3])} ... failed ({result.returncode}):\n{output}")


# ------------------------------------------------------------------------------ main


def build(names: ImageNames, which: Iterable[str], force: bool) -> None:
    defaults = ImageNames()
    try:
        client = docker.from_env(timeout=600)
        client.ping()
    except docker.errors.DockerException as exc:
        raise BuildError(
            f"no Docker engine answers ({exc}). Start one, or run compose/setup-host.sh "
            "as root on Debian to install and start it."
        ) from exc
    tags = {
        "base": names.base,
        "rabbitmq": names.rabbitmq,
        "postgres": names.postgres,
        "app": names.app,
        "agent": names.agent,
        "run-tiny": names.run_tiny,
        "example-location": names.example_location,
        "host": names.host,
    }
    default_tags = {
        "base": defaults.base,
        "rabbitmq": defaults.rabbitmq,
        "postgres": defaults.postgres,
        "app": defaults.app,
        "agent": defaults.agent,
        "run-tiny": defaults.run_tiny,
        "example-location": defaults.example_location,
        "host": defaults.host,
    }
    wanted = [name for name in ORDER if name in set(which)]
    needs_base = any(tags[n] == default_tags[n] for n in wanted if n != "base")
    if "base" in wanted or (needs_base and current_hash(client, names.base) is None):
        build_base(client, names.base, force and "base" in wanted)
    inputs = {
        "app": tuple(ROOT / p for p in PROJECT_SOURCES),
        "agent": tuple(ROOT / p for p in PROJECT_SOURCES),
        "example-location": tuple(ROOT / p for p in EXAMPLE_SOURCES),
    }
    with tempfile.TemporaryDirectory(prefix="hd-wheelhouses-") as tmp:
        wheelhouses = Wheelhouses(Path(tmp))
        for name in wanted:
            if name == "base":
                continue
            if tags[name] != default_tags[name]:
                use_provided(client, tags[name])
                continue
            build_recipe(
                client,
                name,
                tags[name],
                names.base,
                force,
                wheelhouses,
                extra_inputs=inputs.get(name, ()),
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"any of: {', '.join(ORDER)}")
    parser.add_argument("--force", action="store_true", help="rebuild even when up to date")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(ORDER))
    if unknown:
        parser.error(f"unknown image {', '.join(unknown)}; choose from {', '.join(ORDER)}")
    started = time.monotonic()
    try:
        build(ImageNames.from_env(), args.names or ORDER, args.force)
    except BuildError as exc:
        print(f"[images] error: {exc}", file=sys.stderr)
        return 1
    log(f"all images ready in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

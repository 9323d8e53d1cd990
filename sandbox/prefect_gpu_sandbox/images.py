"""What goes into the project's container images, as pure functions of the repository's files.

Each Dockerfile target has a lock (constraints/<target>.txt: exact versions with hashes, made by
``make lock`` from the pyprojects and checked against them by the unit tests), a context (the
files its stages COPY, read from the Dockerfile itself) and a cache key over all of it. The
builder is :mod:`prefect_gpu_sandbox.image_builder`.
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from prefect_gpu_sandbox.paths import REPOSITORY

__all__ = [
    "BASE",
    "IGNORED",
    "IMAGES",
    "INIT",
    "LOCK_PLATFORM",
    "LOCK_PYTHON",
    "BaseRecipe",
    "ImageSpec",
    "archive_config",
    "cache_key",
    "context_files",
    "context_paths",
    "lock_inputs",
    "parse_lock",
    "read_pyproject",
    "uncovered",
]

# The init process of every image (PID 1: forwards signals, reaps orphaned flow-run processes).
# A static binary in a PyPI wheel: the same file on python:slim and on a Debian base, locked
# with the rest, and no apt-get inside the build.
INIT = "dumb-init==1.2.5.post1"
REGISTRY = "ghcr.io/prefect-gpu-operator"
# Bumped when the builder changes what it makes from the same inputs.
_BUILDER_VERSION = "1"
# The environment the locks are resolved for, and their markers evaluated in.
LOCK_PYTHON = "3.11"
LOCK_PLATFORM = (
    "x86_64-manylinux_2_36"  # glibc of Debian bookworm, which python:3.11-slim-bookworm is too
)
_MARKERS = {
    "python_version": LOCK_PYTHON,
    "python_full_version": f"{LOCK_PYTHON}.2",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
}
# What .dockerignore keeps out of the context: never hashed, never copied.
IGNORED = ("__pycache__", "*.pyc", "*.egg-info")


@dataclass(frozen=True)
class ImageSpec:
    """One Dockerfile target, the pyproject (and extras) its lock is made from, and its name."""

    target: str
    repository: str
    project: str
    extras: tuple[str, ...] = ()
    tag_suffix: str = ""

    @property
    def lock(self) -> str:
        return f"constraints/{self.target}.txt"

    def reference(self, version: str) -> str:
        return f"{REGISTRY}/{self.repository}:{version}{self.tag_suffix}"


IMAGES = {
    spec.target: spec
    for spec in (
        ImageSpec("operator", "prefect-gpu-operator", "pyproject.toml"),
        ImageSpec("worker", "prefect-gpu-worker", "flows/pyproject.toml", ("inference",)),
        ImageSpec("worker-cuda", "prefect-gpu-worker", "flows/pyproject.toml", ("cuda",), "-cuda"),
    )
}


# --- locks ---------------------------------------------------------------------------------


def lock_inputs(pyproject: Mapping[str, Any], extras: Iterable[str] = ()) -> list[str]:
    """What an image's lock pins: the project's dependencies and extras, what builds it
    (installed without build isolation, so offline) and the init."""
    project = pyproject["project"]
    requirements = list(project.get("dependencies", []))
    for extra in extras:
        requirements += project["optional-dependencies"][extra]
    return [*requirements, *pyproject["build-system"]["requires"], INIT]


def parse_lock(text: str) -> dict[str, Version]:
    """The exact pins (``name==version``) of a requirements file, by canonical name."""
    pins = re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", text, flags=re.MULTILINE)
    return {canonicalize_name(name): Version(version) for name, version in pins}


def uncovered(requirements: Iterable[str], pins: Mapping[str, Version]) -> list[str]:
    """The requirements that ``pins`` does not satisfy, each with the reason."""
    problems = []
    for line in requirements:
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate(_MARKERS):
            continue
        pinned = pins.get(canonicalize_name(requirement.name))
        if pinned is None:
            problems.append(f"{line}: not in the lock")
        elif not requirement.specifier.contains(pinned, prereleases=True):
            problems.append(f"{line}: the lock has {pinned}")
    return problems


def read_pyproject(spec: ImageSpec, repository: Path = REPOSITORY) -> dict[str, Any]:
    return tomllib.loads((repository / spec.project).read_text())


# --- what goes into an image ---------------------------------------------------------------


def _instructions(dockerfile: str) -> Iterator[tuple[str, str]]:
    """(KEYWORD, arguments) of each instruction, continuation lines joined, comments dropped."""
    pending = ""
    for line in dockerfile.splitlines():
        if line.strip().startswith("#") or not (pending or line.strip()):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, arguments = (pending + line).strip().partition(" ")
        pending = ""
        yield keyword.upper(), arguments.strip()


def context_paths(dockerfile: str, target: str) -> list[str]:
    """The context paths that the stages of ``target`` copy (COPY/ADD without --from)."""
    stages: dict[str, tuple[str | None, list[str]]] = {}
    current: str | None = None
    for keyword, arguments in _instructions(dockerfile):
        # COPY and ADD may take their paths as a JSON array; a RUN's "[" is the shell's test.
        exec_form = keyword in {"COPY", "ADD"} and arguments.startswith("[")
        words: list[str] = json.loads(arguments) if exec_form else arguments.split()
        if keyword == "FROM":
            image = words[0]
            current = words[2] if len(words) > 2 and words[1].lower() == "as" else str(len(stages))
            stages[current] = (image if image in stages else None, [])
        elif keyword == "RUN" and any(
            word.startswith("--mount=") and "type=bind" in word and "from=" not in word
            for word in words
        ):
            # The builder stages and hashes exactly what COPY and ADD name.
            raise ValueError(
                f"a RUN mounts the build context, which the builder cannot hash: {arguments}"
            )
        elif keyword in {"COPY", "ADD"} and not any(w.startswith("--from=") for w in words):
            assert current is not None, f"{keyword} before FROM"
            stages[current][1].extend(w for w in words[:-1] if not w.startswith("--"))
    if target not in stages:
        raise KeyError(f"no stage {target!r} in the Dockerfile (stages: {', '.join(stages)})")
    paths: list[str] = []
    stage: str | None = target
    while stage is not None:
        parent, copied = stages[stage]
        paths += copied
        stage = parent
    return sorted({path.rstrip("/") for path in paths})


def _ignored(relative: Path) -> bool:
    return any(fnmatch(part, pattern) for part in relative.parts for pattern in IGNORED)


def context_files(repository: Path, paths: Iterable[str]) -> dict[str, bytes]:
    """The files under ``paths`` as the build sees them (without what .dockerignore drops)."""
    files: dict[str, bytes] = {}
    for path in paths:
        root = repository / path
        candidates = sorted(root.rglob("*")) if root.is_dir() else [root]
        for file in candidates:
            relative = file.relative_to(repository)
            if file.is_file() and not _ignored(relative):
                files[relative.as_posix()] = file.read_bytes()
    return files


def cache_key(*parts: bytes | str, files: Mapping[str, bytes]) -> str:
    """A digest of ``parts`` and of every file's path and content (unambiguously framed)."""
    digest = hashlib.sha256(_BUILDER_VERSION.encode())
    for item in [*parts, *(x for name in sorted(files) for x in (name, files[name]))]:
        data = item.encode() if isinstance(item, str) else item
        digest.update(len(data).to_bytes(8, "big") + data)
    return digest.hexdigest()[:16]


# --- the base ------------------------------------------------------------------------------


@dataclass(frozen=True)
class BaseRecipe:
    """A minimal Debian root filesystem with Python 3.11, made by mmdebstrap."""

    suite: str = "bookworm"
    packages: tuple[str, ...] = ("python3", "python3-venv", "ca-certificates")
    mirror: str = "http://deb.debian.org"

    def sources(self) -> list[str]:
        """sources.list lines: the release, its updates and the security archive."""
        return [
            f"deb {self.mirror}/debian {self.suite} main",
            f"deb {self.mirror}/debian {self.suite}-updates main",
            f"deb {self.mirror}/debian-security {self.suite}-security main",
        ]

    def command(self, output: Path) -> list[str]:
        # Documentation goes (licences stay); images need neither manuals nor translations.
        slim = [
            "path-exclude=/usr/share/man/*",
            "path-exclude=/usr/share/info/*",
            "path-exclude=/usr/share/locale/*",
            "path-exclude=/usr/share/doc/*",
            "path-include=/usr/share/doc/*/copyright",
        ]
        return [
            "mmdebstrap",
            "--variant=minbase",
            "--format=tar",
            "--quiet",
            f"--include={','.join(self.packages)}",
            *(f"--dpkgopt={option}" for option in slim),
            self.suite,
            str(output),
            *self.sources(),
        ]

    @property
    def key(self) -> str:
        return cache_key(*self.command(Path("-")), files={})


BASE = BaseRecipe()


# --- reading an archive --------------------------------------------------------------------


def _blob(archive: tarfile.TarFile, digest: str) -> Any:
    member = archive.extractfile("blobs/" + digest.replace(":", "/"))
    assert member is not None, digest
    return json.load(member)


def archive_config(path: Path) -> dict[str, Any]:
    """An OCI archive's reference name and its image configuration (User, Entrypoint, Cmd...)."""
    with tarfile.open(path) as archive:
        index = json.load(archive.extractfile("index.json"))  # type: ignore[arg-type]
        (descriptor,) = index["manifests"]
        manifest = _blob(archive, descriptor["digest"])
        config = _blob(archive, manifest["config"]["digest"])
    name = descriptor.get("annotations", {}).get("org.opencontainers.image.ref.name")
    return {"reference": name, **config.get("config", {})}

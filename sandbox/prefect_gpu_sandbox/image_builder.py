"""Build the project's images offline from the repository's own Dockerfile, as OCI archives.

    prefect-gpu-sandbox build-images [--cuda]   # then: ctr -n k8s.io images import ARCHIVE
    prefect-gpu-sandbox lock-images             # `make lock`: constraints/<target>.txt

No Docker and no registry: the base is a Debian root filesystem made by mmdebstrap (Debian's
python3 is 3.11), imported as a local image; buildah builds each Dockerfile target on it with
``--build-arg BASE=<that image>`` (chroot isolation and the host's network, so no container
runtime is needed and pip reaches PyPI) and writes it as an OCI archive. Archives are cached
under ``~/.cache/prefect-gpu-operator/images`` by a hash of everything that goes into them, so
building again costs a hash; buildah's layer cache there keeps a target's dependency layer when
only its source changed. Needs root; apt-get installs mmdebstrap and buildah when missing.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from prefect_gpu_sandbox.images import (
    BASE,
    IMAGES,
    LOCK_PLATFORM,
    LOCK_PYTHON,
    BaseRecipe,
    ImageSpec,
    cache_key,
    context_files,
    context_paths,
    lock_inputs,
    read_pyproject,
)
from prefect_gpu_sandbox.paths import REPOSITORY
from prefect_gpu_sandbox.tools import cache_dir

__all__ = [
    "Buildah",
    "BuiltImage",
    "build_image",
    "cached_archive",
    "ensure_builder_tools",
    "images_dir",
    "write_locks",
]

_BASE_NAME = "localhost/prefect-gpu-base"


def images_dir() -> Path:
    return cache_dir() / "images"


def _run(what: str, command: list[str], env: Mapping[str, str] | None = None) -> str:
    """A command's output; when it fails, the end of that output is in the error."""
    result = subprocess.run(
        command, stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env
    )
    if result.returncode != 0:
        output = (result.stdout + result.stderr)[-6000:]
        raise RuntimeError(f"{what} exited {result.returncode}:\n{output}")
    return result.stdout


# --- locks ---------------------------------------------------------------------------------


def _lock_command(spec: ImageSpec) -> list[str]:
    # uv resolves for the images' platform whatever this machine is, reads the inputs on stdin,
    # and keeps the versions already in the output file unless they no longer fit.
    return [
        *(["uv"] if shutil.which("uv") else [sys.executable, "-m", "uv"]),
        "pip",
        "compile",
        "--quiet",
        "--generate-hashes",
        f"--python-version={LOCK_PYTHON}",
        f"--python-platform={LOCK_PLATFORM}",
        "--custom-compile-command=make lock",
        f"--output-file={spec.lock}",
        "-",
    ]


def write_locks(repository: Path = REPOSITORY) -> list[Path]:
    """Regenerate every image's constraints file from its pyproject."""
    (repository / "constraints").mkdir(exist_ok=True)
    for spec in IMAGES.values():
        inputs = "\n".join(lock_inputs(read_pyproject(spec, repository), spec.extras)) + "\n"
        subprocess.run(_lock_command(spec), input=inputs, text=True, check=True, cwd=repository)
    return [repository / spec.lock for spec in IMAGES.values()]


# --- buildah -------------------------------------------------------------------------------


class Buildah:
    """buildah with a storage of its own under the cache (its layer cache lives there too)."""

    def __init__(self, directory: Path) -> None:
        self.options = [
            f"--root={directory / 'storage'}",
            f"--runroot={directory / 'run'}",
            "--storage-driver=overlay",
        ]

    def __call__(self, *arguments: str) -> str:
        return _run(f"buildah {arguments[0]}", ["buildah", *self.options, *arguments])

    def has_image(self, reference: str) -> bool:
        try:
            self("inspect", "--type=image", reference)
        except RuntimeError:
            return False
        return True

    @contextlib.contextmanager
    def container(self, image: str) -> Iterator[str]:
        """A working container of ``image`` (a name or ``oci-archive:PATH``), removed after."""
        name = self("from", "--pull=never", "--quiet", image).strip()
        try:
            yield name
        finally:
            self("rm", name)

    def run(self, container: str, *argv: str) -> str:
        """Run a command in a container's root filesystem as its configured user."""
        return self("run", "--isolation=chroot", "--network=host", container, "--", *argv)


def ensure_builder_tools(*, install: bool = True) -> None:
    """mmdebstrap and buildah, from Debian's packages when they are missing."""
    missing = [tool for tool in ("mmdebstrap", "buildah") if shutil.which(tool) is None]
    if not missing:
        return
    if not install or os.geteuid() != 0:
        raise RuntimeError(f"missing {', '.join(missing)}: apt-get install {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    _run("apt-get update", ["apt-get", "update", "-qq"], env)
    _run("apt-get install", ["apt-get", "install", "-y", "-qq", *missing], env)


# --- building ------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuiltImage:
    target: str
    reference: str
    archive: Path
    seconds: float
    cached: bool


@dataclass(frozen=True)
class _Inputs:
    """Everything one target's archive is made from, and the key that names it."""

    spec: ImageSpec
    reference: str
    dockerfile: bytes
    files: Mapping[str, bytes]
    key: str

    @classmethod
    def read(cls, spec: ImageSpec, repository: Path, recipe: BaseRecipe) -> _Inputs:
        dockerfile = (repository / "Dockerfile").read_bytes()
        files = context_files(repository, context_paths(dockerfile.decode(), spec.target))
        reference = spec.reference(read_pyproject(spec, repository)["project"]["version"])
        key = cache_key(dockerfile, spec.target, reference, recipe.key, files=files)
        return cls(spec, reference, dockerfile, files, key)

    def archive(self, directory: Path) -> Path:
        return directory / f"{self.spec.target}-{self.key}.oci.tar"


def cached_archive(
    spec: ImageSpec, *, repository: Path = REPOSITORY, recipe: BaseRecipe = BASE
) -> Path | None:
    """The target's archive if one was built from exactly the current inputs."""
    archive = _Inputs.read(spec, repository, recipe).archive(images_dir())
    return archive if archive.exists() else None


def build_image(
    spec: ImageSpec,
    *,
    repository: Path = REPOSITORY,
    recipe: BaseRecipe = BASE,
    directory: Path | None = None,
) -> BuiltImage:
    """One target's OCI archive: the cached one when its inputs are unchanged."""
    started = time.monotonic()
    directory = directory or images_dir()
    inputs = _Inputs.read(spec, repository, recipe)
    archive = inputs.archive(directory)
    with _exclusive(directory):
        cached = archive.exists()
        if not cached:
            if os.geteuid() != 0:
                raise RuntimeError("building images needs root (mmdebstrap, buildah's chroot)")
            ensure_builder_tools()
            buildah = Buildah(directory / "buildah")
            _build(buildah, inputs, _base(buildah, directory, recipe), directory, archive)
            _forget_all_but(buildah, directory, spec.target, archive, recipe)
    return BuiltImage(spec.target, inputs.reference, archive, time.monotonic() - started, cached)


@contextlib.contextmanager
def _exclusive(directory: Path) -> Iterator[None]:
    """One build at a time per cache: a second caller waits, then finds the archive made."""
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _base(buildah: Buildah, directory: Path, recipe: BaseRecipe) -> str:
    """The recipe's root filesystem as a local image (made once per recipe)."""
    reference = f"{_BASE_NAME}:{recipe.key}"
    if buildah.has_image(reference):
        return reference
    rootfs = directory / f"base-{recipe.key}.tar"
    if not rootfs.exists():
        partial = directory / f"base-{recipe.key}.partial"
        # stdin is /dev/null: mmdebstrap would read sources from a stdin that is not a terminal.
        _run("mmdebstrap", recipe.command(partial))
        partial.rename(rootfs)
    with buildah.container("scratch") as container:
        buildah("add", "--quiet", container, str(rootfs), "/")
        buildah(
            "config",
            "--env=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "--env=LANG=C.UTF-8",
            "--cmd=/bin/sh",
            container,
        )
        buildah("commit", "--quiet", container, reference)
    return reference


def _ca_bundle() -> Path | None:
    """The CA bundle this machine's pip trusts, for a build behind a TLS-inspecting proxy."""
    candidates = [os.environ.get("PIP_CERT"), os.environ.get("SSL_CERT_FILE")]
    for candidate in [*candidates, "/etc/ssl/certs/ca-certificates.crt"]:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def _build(buildah: Buildah, inputs: _Inputs, base: str, directory: Path, archive: Path) -> None:
    # The context holds exactly the hashed files, so the key covers all that the build sees.
    context = directory / "context" / inputs.spec.target
    shutil.rmtree(context, ignore_errors=True)
    for name, content in {**inputs.files, "Dockerfile": inputs.dockerfile}.items():
        (context / name).parent.mkdir(parents=True, exist_ok=True)
        (context / name).write_bytes(content)
    bundle = _ca_bundle()
    try:
        buildah(
            "build",
            "--isolation=chroot",  # no runtime, cgroups or network namespace needed
            "--network=host",
            "--layers",
            "--pull=never",
            f"--target={inputs.spec.target}",
            f"--build-arg=BASE={base}",
            *([f"--secret=id=ca-certificates,src={bundle}"] if bundle else []),
            f"--tag={inputs.reference}",
            str(context),
        )
    finally:
        shutil.rmtree(context)
    partial = archive.with_suffix(".partial")
    partial.unlink(missing_ok=True)
    # zstd: half the time of gzip on the GBs of the CUDA image; containerd 1.5+ reads it.
    destination = f"oci-archive:{partial}:{inputs.reference}"
    buildah("push", "--quiet", "--compression-format=zstd", inputs.reference, destination)
    partial.rename(archive)


def _forget_all_but(
    buildah: Buildah, directory: Path, target: str, archive: Path, recipe: BaseRecipe
) -> None:
    """Drop the target's older archives, older bases, and the layers only they used."""
    for stale in directory.glob("*.oci.tar"):
        if stale.name.rsplit("-", 1)[0] == target and stale != archive:
            stale.unlink()
    for stale in directory.glob("base-*.tar"):
        if stale.name != f"base-{recipe.key}.tar":
            stale.unlink()
    names = buildah("images", "--format={{.Name}}:{{.Tag}}").split()
    for name in names:
        if name.startswith(f"{_BASE_NAME}:") and name != f"{_BASE_NAME}:{recipe.key}":
            buildah("rmi", name)
    buildah("rmi", "--prune")

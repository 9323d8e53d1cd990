"""OCI image archives written in pure Python, so the node gets images with no registry at all.

An archive holds ``oci-layout``, ``index.json`` and content-addressed blobs (uncompressed tar
layers, the image config, the manifest); ``ctr images import`` reads it as it is. Entries carry
fixed owners and times, so the same inputs give the same digests.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "BUSYBOX",
    "ImageConfig",
    "busybox_layer",
    "image_archive",
    "layer",
    "write_busybox_image",
]

_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
_CONFIG = "application/vnd.oci.image.config.v1+json"
_LAYER = "application/vnd.oci.image.layer.v1.tar"
# Debian's busybox-static, which the tool install provides: a dynamically linked one would not
# run in an image without its libraries.
BUSYBOX = Path("/bin/busybox")
_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Mount points the runtime fills in, and a world-writable /tmp.
_DIRECTORIES = {"dev": 0o755, "etc": 0o755, "proc": 0o555, "root": 0o700, "run": 0o755}
_DIRECTORIES |= {"sys": 0o555, "tmp": 0o1777, "var": 0o755}


@dataclass(frozen=True)
class ImageConfig:
    """What a container of the image runs, as ``docker inspect`` would show it."""

    entrypoint: Sequence[str] = ()
    cmd: Sequence[str] = ()
    env: Sequence[str] = (f"PATH={_PATH}",)
    working_dir: str = "/"
    labels: dict[str, str] = field(default_factory=dict)


def _digest(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def _canonical(document: dict[str, Any]) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def _add(archive: tarfile.TarFile, info: tarfile.TarInfo, data: bytes | None = None) -> None:
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    if data is None:
        archive.addfile(info)
    else:
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))


def layer(
    files: dict[str, tuple[bytes, int]],
    *,
    symlinks: dict[str, str] | None = None,
    directories: dict[str, int] | None = None,
) -> bytes:
    """A tar layer: ``files`` maps a path to (content, mode), ``symlinks`` a path to its target,
    ``directories`` a path to its mode. Parents of every entry are made 0755 unless given."""
    links = symlinks or {}
    modes = dict(directories or {})
    for path in [*files, *links, *modes]:
        parent = Path(path).parent
        while str(parent) not in (".", "/"):
            modes.setdefault(str(parent), 0o755)
            parent = parent.parent
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for path in sorted(modes):
            info = tarfile.TarInfo(path)
            info.type, info.mode = tarfile.DIRTYPE, modes[path]
            _add(archive, info)
        for path in sorted(files):
            content, mode = files[path]
            info = tarfile.TarInfo(path)
            info.mode = mode
            _add(archive, info, content)
        for path in sorted(links):
            info = tarfile.TarInfo(path)
            info.type, info.linkname, info.mode = tarfile.SYMTYPE, links[path], 0o777
            _add(archive, info)
    return buffer.getvalue()


def busybox_layer(busybox: bytes, applets: Iterable[str]) -> bytes:
    """A root filesystem of one static busybox: ``applets`` are its paths as
    ``busybox --list-full`` prints them (``bin/sh``, ``usr/bin/env``, ...)."""
    links = {applet: "/bin/busybox" for applet in applets if applet != "bin/busybox"}
    return layer({"bin/busybox": (busybox, 0o755)}, symlinks=links, directories=_DIRECTORIES)


def image_archive(
    reference: str,
    layers: Sequence[bytes],
    config: ImageConfig,
    *,
    architecture: str = "amd64",
) -> bytes:
    """An OCI image archive of ``layers`` (uncompressed tars, lowest first) named ``reference``
    (a full reference such as ``localhost/name:tag``, as Kubernetes would normalise it)."""
    image_config = {
        "architecture": architecture,
        "os": "linux",
        "config": {
            key: value
            for key, value in {
                "Entrypoint": list(config.entrypoint),
                "Cmd": list(config.cmd),
                "Env": list(config.env),
                "WorkingDir": config.working_dir,
                "Labels": config.labels,
            }.items()
            if value
        },
        "rootfs": {"type": "layers", "diff_ids": [_digest(data) for data in layers]},
    }
    config_blob = _canonical(image_config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": _MANIFEST,
        "config": {"mediaType": _CONFIG, "digest": _digest(config_blob), "size": len(config_blob)},
        "layers": [
            {"mediaType": _LAYER, "digest": _digest(data), "size": len(data)} for data in layers
        ],
    }
    manifest_blob = _canonical(manifest)
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                "mediaType": _MANIFEST,
                "digest": _digest(manifest_blob),
                "size": len(manifest_blob),
                "platform": {"architecture": architecture, "os": "linux"},
                "annotations": {
                    # containerd names the imported image after this one.
                    "io.containerd.image.name": reference,
                    "org.opencontainers.image.ref.name": reference.rpartition(":")[2],
                },
            }
        ],
    }
    blobs = {_digest(blob): blob for blob in [*layers, config_blob, manifest_blob]}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, mode in [("blobs", 0o755), ("blobs/sha256", 0o755)]:
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, mode
            _add(archive, info)
        for digest, blob in sorted(blobs.items()):
            info = tarfile.TarInfo(f"blobs/sha256/{digest.removeprefix('sha256:')}")
            info.mode = 0o644
            _add(archive, info, blob)
        layout: dict[str, Any] = {"imageLayoutVersion": "1.0.0"}
        for name, document in [("oci-layout", layout), ("index.json", index)]:
            info = tarfile.TarInfo(name)
            info.mode = 0o644
            _add(archive, info, _canonical(document))
    return buffer.getvalue()


def write_busybox_image(
    path: Path,
    reference: str,
    config: ImageConfig,
    *,
    busybox: Path | None = None,
) -> Path:
    """Write an OCI archive of a busybox image named ``reference`` to ``path``."""
    binary = busybox or BUSYBOX
    listing = subprocess.run(
        [str(binary), "--list-full"], capture_output=True, text=True, check=True
    ).stdout
    archive = image_archive(
        reference, [busybox_layer(binary.read_bytes(), listing.split())], config
    )
    path.write_bytes(archive)
    return path

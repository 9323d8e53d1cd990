"""OCI image archives: a valid layout whose digests match their blobs, the same bytes for the
same inputs, named as containerd's import expects."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from typing import Any

from prefect_gpu_sandbox.oci import ImageConfig, busybox_layer, image_archive, layer

REFERENCE = "localhost/sandbox/busybox:1"


def _members(archive: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        return {
            member.name: tar.extractfile(member).read()  # type: ignore[union-attr]
            for member in tar.getmembers()
            if member.isfile()
        }


def _blob(files: dict[str, bytes], digest: str) -> bytes:
    return files[f"blobs/sha256/{digest.removeprefix('sha256:')}"]


def _document(files: dict[str, bytes], digest: str) -> Any:
    return json.loads(_blob(files, digest))


def test_archive_is_an_oci_layout_whose_digests_match() -> None:
    root = layer({"bin/tool": (b"#!/bin/sh\n", 0o755)})
    files = _members(image_archive(REFERENCE, [root], ImageConfig(cmd=["tool"])))
    assert json.loads(files["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    for name, blob in files.items():
        if name.startswith("blobs/sha256/"):
            assert hashlib.sha256(blob).hexdigest() == name.rsplit("/", 1)[1]
    [entry] = json.loads(files["index.json"])["manifests"]
    assert entry["annotations"]["io.containerd.image.name"] == REFERENCE
    assert entry["platform"] == {"architecture": "amd64", "os": "linux"}
    manifest = _document(files, entry["digest"])
    config = _document(files, manifest["config"]["digest"])
    assert config["config"]["Cmd"] == ["tool"]
    # The config names the uncompressed layer, which here is the blob itself.
    assert config["rootfs"]["diff_ids"] == [layer["digest"] for layer in manifest["layers"]]
    assert _blob(files, manifest["layers"][0]["digest"]) == root


def test_same_inputs_give_the_same_archive() -> None:
    def build() -> bytes:
        root = layer({"etc/motd": (b"hi\n", 0o644)}, symlinks={"bin/sh": "/bin/busybox"})
        return image_archive(REFERENCE, [root], ImageConfig(entrypoint=["sleep", "inf"]))

    assert build() == build()


def test_busybox_layer_links_each_applet_to_the_binary() -> None:
    root = busybox_layer(b"\x7fELF", ["bin/busybox", "bin/sh", "usr/bin/env"])
    with tarfile.open(fileobj=io.BytesIO(root)) as tar:
        members = {member.name: member for member in tar.getmembers()}
    assert members["bin/busybox"].mode == 0o755
    assert members["bin/sh"].linkname == "/bin/busybox"
    assert members["usr/bin/env"].issym()
    assert members["usr"].isdir()
    assert members["tmp"].mode == 0o1777
    assert all(member.uid == 0 and member.mtime == 0 for member in members.values())

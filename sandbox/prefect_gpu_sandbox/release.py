"""The release: what a maintainer with a registry runs to publish one version (docs/releasing.md).

    prefect-gpu-sandbox release --registry REGISTRY [--version VERSION] --dry-run
    python -m prefect_gpu_sandbox.release ...   # the same with only PyYAML and packaging (CI)

In this order, so that nothing published points at something not yet pushed:

1. the images: ``docker buildx build --push`` of each Dockerfile target, tagged as the chart
   names them (``<registry>/prefect-gpu-operator:<version>``, ``<registry>/prefect-gpu-worker``
   with ``<version>`` and ``<version>-cuda``), on a ``BASE`` that can be pinned by digest;
2. the chart: a copy whose default image repositories are the registry's (the checkout's are a
   placeholder, ``images.REGISTRY``), with the LICENSE, linted, ``helm package``-d and
   ``helm push``-ed to ``oci://<registry>/charts``;
3. the two Python distributions, prefect-gpu-operator and prefect-gpu-flows: ``python -m build``,
   ``twine check`` and ``twine upload``. The sandbox is the development harness and is never
   published.

Every fact comes from the repository: the version from the pyprojects and Chart.yaml (which must
agree), the image names from :data:`prefect_gpu_sandbox.images.IMAGES`, the placeholder from the
chart's values, the default base from the Dockerfile.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from prefect_gpu_sandbox.images import IMAGES, ImageSpec
from prefect_gpu_sandbox.paths import CHART, REPOSITORY

__all__ = [
    "CHART_IMAGES",
    "DISTRIBUTIONS",
    "PLATFORM",
    "PUBLISHED_IMAGES",
    "Release",
    "ReleaseError",
    "Step",
    "add_release_command",
    "chart_placeholder",
    "declared_license",
    "declared_versions",
    "default_base",
    "fill_chart_text",
    "image_references",
    "main",
    "plan",
    "repository_version",
    "stage_chart",
]

# The published Python distributions: name -> project directory (relative to the repository).
DISTRIBUTIONS = {"prefect-gpu-operator": ".", "prefect-gpu-flows": "flows"}
# The chart's image values (path in values.yaml) and the Dockerfile target each one names.
CHART_IMAGES = {("operator", "image"): "operator", ("inferenceWorker", "image"): "worker"}
# The image repositories the release pushes (the CUDA worker shares the worker's, with a suffix).
PUBLISHED_IMAGES = tuple(sorted({spec.repository for spec in IMAGES.values()}))
# The locks are resolved for this platform only (images.LOCK_PLATFORM).
PLATFORM = "linux/amd64"
STAGES = ("images", "chart", "python")


class ReleaseError(Exception):
    """The repository or the arguments do not make a consistent release."""


# --- facts from the repository -------------------------------------------------------------


def _pyproject_version(directory: str, repository: Path) -> str:
    data = tomllib.loads((repository / directory / "pyproject.toml").read_text())
    return str(data["project"]["version"])


def declared_versions(repository: Path = REPOSITORY) -> dict[str, str]:
    """Every version the release publishes under, by where it is declared."""
    chart = yaml.safe_load((repository / "charts/prefect-gpu-operator/Chart.yaml").read_text())
    versions = {
        f"{name} ({(Path(directory) / 'pyproject.toml').as_posix()})": _pyproject_version(
            directory, repository
        )
        for name, directory in DISTRIBUTIONS.items()
    }
    versions["Chart.yaml version"] = str(chart["version"])
    versions["Chart.yaml appVersion"] = str(chart["appVersion"])
    return versions


def repository_version(repository: Path = REPOSITORY) -> str:
    """The one version the repository declares; an error naming each when they disagree."""
    versions = declared_versions(repository)
    if len(set(versions.values())) != 1:
        listed = ", ".join(f"{where} = {version}" for where, version in versions.items())
        raise ReleaseError(f"the versions disagree: {listed}")
    return next(iter(versions.values()))


def declared_license(repository: Path = REPOSITORY) -> str:
    """The SPDX licence the operator's pyproject declares (the others are tested to agree)."""
    data = tomllib.loads((repository / "pyproject.toml").read_text())
    return str(data["project"]["license"])


def default_base(dockerfile: str) -> str:
    """The Dockerfile's default ``BASE`` build argument."""
    match = re.search(r"^ARG BASE=(\S+)", dockerfile, flags=re.MULTILINE)
    if match is None:
        raise ReleaseError("the Dockerfile declares no default `ARG BASE=`")
    return match.group(1)


def _lookup(values: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        values = values[key]
    return values


def chart_placeholder(values: dict[str, Any]) -> str:
    """The registry part of the chart's default image repositories (one for all of them)."""
    prefixes = set()
    for path, target in CHART_IMAGES.items():
        repository = str(_lookup(values, path)["repository"])
        prefix, _, name = repository.rpartition("/")
        if name != IMAGES[target].repository or not prefix:
            raise ReleaseError(
                f"values {'.'.join(path)}.repository is {repository!r}: expected "
                f"<registry>/{IMAGES[target].repository}"
            )
        prefixes.add(prefix)
    if len(prefixes) != 1:
        raise ReleaseError(f"the chart's images name several registries: {sorted(prefixes)}")
    return prefixes.pop()


def fill_chart_text(text: str, placeholder: str, registry: str) -> str:
    """``text`` (values.yaml, the chart's README) with the placeholder's image repositories
    replaced by the registry's; comments and layout stay as they are."""
    names = "|".join(re.escape(name) for name in PUBLISHED_IMAGES)
    pattern = re.compile(rf"(?<![\w./-]){re.escape(placeholder)}/(?=(?:{names})\b)")
    return pattern.sub(lambda _: registry + "/", text)


def image_references(registry: str, version: str) -> dict[str, str]:
    """What the release pushes, by Dockerfile target."""
    return {
        target: f"{registry}/{spec.repository}:{version}{spec.tag_suffix}"
        for target, spec in IMAGES.items()
    }


def stage_chart(registry: str, destination: Path, repository: Path = REPOSITORY) -> Path:
    """A copy of the chart under ``destination`` whose default images are the registry's, with
    the repository's LICENSE; returns its directory."""
    source = repository / CHART.relative_to(REPOSITORY)
    values_text = (source / "values.yaml").read_text()
    placeholder = chart_placeholder(yaml.safe_load(values_text))
    staged = destination / source.name
    if staged.exists():
        shutil.rmtree(staged)
    shutil.copytree(source, staged)
    for name in ("values.yaml", "README.md"):
        if (staged / name).exists():
            text = (staged / name).read_text()
            (staged / name).write_text(fill_chart_text(text, placeholder, registry))
    shutil.copyfile(repository / "LICENSE", staged / "LICENSE")
    filled = chart_placeholder(yaml.safe_load((staged / "values.yaml").read_text()))
    if filled != registry:  # the replacement missed a repository line
        raise ReleaseError(f"the staged chart still names {filled}, not {registry}")
    return staged


# --- the plan ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One command of the release (or, with ``action``, one thing done in-process)."""

    stage: str
    what: str
    argv: tuple[str, ...] = ()
    action: Callable[[], object] | None = None

    def show(self) -> str:
        if self.action is not None:
            return f"# {self.what}"
        return shlex.join(self.argv)


@dataclass(frozen=True)
class Release:
    registry: str
    version: str
    base: str
    dist: Path
    repository: Path = REPOSITORY
    chart_repository: str = ""
    pypi_repository_url: str | None = None
    helm: str = "helm"
    python: str = sys.executable
    stages: tuple[str, ...] = STAGES
    images: tuple[str, ...] = field(default_factory=lambda: tuple(IMAGES))

    def path(self, path: Path) -> str:
        """``path`` as the commands name it: relative to the repository, where they run."""
        return (
            str(path.relative_to(self.repository))
            if path.is_relative_to(self.repository)
            else str(path)
        )

    @property
    def chart_oci(self) -> str:
        return self.chart_repository or f"oci://{self.registry}/charts"

    @property
    def chart_archive(self) -> Path:
        return self.dist / f"{CHART.name}-{self.version}.tgz"

    def python_artifacts(self) -> list[Path]:
        """The wheel and sdist of each distribution, as ``python -m build`` names them."""
        out = self.dist / "python"
        names = [name.replace("-", "_") for name in DISTRIBUTIONS]
        return [
            out / artifact
            for name in names
            for artifact in (
                f"{name}-{self.version}-py3-none-any.whl",
                f"{name}-{self.version}.tar.gz",
            )
        ]


def _validate(release: Release) -> None:
    registry = release.registry
    if not registry or "://" in registry or registry.endswith("/") or " " in registry:
        raise ReleaseError(
            f"--registry {registry!r}: give a registry and path without a scheme, "
            "e.g. ghcr.io/<your-org>"
        )
    declared = repository_version(release.repository)
    if release.version != declared:
        raise ReleaseError(
            f"--version {release.version} but the repository declares {declared} "
            "(pyproject.toml, flows/pyproject.toml, Chart.yaml version and appVersion): "
            "bump them together first"
        )
    unknown = set(release.stages) - set(STAGES)
    if unknown:
        raise ReleaseError(f"unknown stages {sorted(unknown)}: choose from {', '.join(STAGES)}")


def _image_step(release: Release, spec: ImageSpec, reference: str) -> Step:
    argv = (
        "docker", "buildx", "build",
        "--platform", PLATFORM,
        "--file", "Dockerfile",
        "--target", spec.target,
        "--build-arg", f"BASE={release.base}",
        "--label", f"org.opencontainers.image.version={release.version}",
        "--label", f"org.opencontainers.image.licenses={declared_license(release.repository)}",
        "--tag", reference,
        "--push",
        ".",
    )  # fmt: skip
    return Step("images", f"build and push {reference}", argv)


def plan(release: Release) -> list[Step]:
    """Every step of ``release``, in order; raises :class:`ReleaseError` before any step when
    the repository or the arguments are inconsistent."""
    _validate(release)
    steps: list[Step] = []
    if "images" in release.stages:
        references = image_references(release.registry, release.version)
        steps += [
            _image_step(release, IMAGES[target], references[target]) for target in release.images
        ]
    if "chart" in release.stages:
        staging = release.dist / "chart"
        staged = staging / CHART.name
        steps += [
            Step(
                "chart",
                f"copy the chart to {staged}, its image repositories set to {release.registry}/…"
                ", with the LICENSE",
                action=lambda: stage_chart(release.registry, staging, release.repository),
            ),
            Step(
                "chart",
                "lint the staged chart",
                (release.helm, "lint", "--strict", release.path(staged)),
            ),
            Step(
                "chart",
                f"package {release.chart_archive.name}",
                (
                    release.helm,
                    "package",
                    release.path(staged),
                    "--destination",
                    release.path(release.dist),
                ),
            ),
            Step(
                "chart",
                f"push the chart to {release.chart_oci}",
                (release.helm, "push", release.path(release.chart_archive), release.chart_oci),
            ),
        ]
    if "python" in release.stages:
        out = release.dist / "python"
        steps += [
            Step(
                "python",
                f"build {name}",
                (release.python, "-m", "build", "--outdir", release.path(out), directory),
            )
            for name, directory in DISTRIBUTIONS.items()
        ]
        artifacts = [release.path(path) for path in release.python_artifacts()]
        upload = [release.python, "-m", "twine", "upload"]
        if release.pypi_repository_url:
            upload += ["--repository-url", release.pypi_repository_url]
        steps += [
            Step(
                "python",
                "check the distributions",
                (release.python, "-m", "twine", "check", *artifacts),
            ),
            Step("python", "upload the distributions", (*upload, *artifacts)),
        ]
    return steps


def run(steps: Iterable[Step], repository: Path = REPOSITORY) -> None:
    """Run ``steps`` in order from the repository's root; the first failure stops the release."""
    for step in steps:
        print(f"==> {step.what}", file=sys.stderr, flush=True)
        if step.action is not None:
            step.action()
        else:
            subprocess.run(step.argv, check=True, cwd=repository)


# --- the command ---------------------------------------------------------------------------


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--registry",
        default=os.environ.get("REGISTRY", ""),
        help="where images and the chart go, without a scheme (e.g. ghcr.io/<org>); "
        "default: $REGISTRY",
    )
    parser.add_argument(
        "--version",
        default=os.environ.get("VERSION") or None,
        help="the version to publish (default: $VERSION, else the repository's); must be the "
        "one the pyprojects and Chart.yaml declare",
    )
    parser.add_argument(
        "--base",
        default=os.environ.get("BASE") or None,
        help="the images' BASE build argument, best pinned by digest "
        "(default: $BASE, else the Dockerfile's)",
    )
    parser.add_argument(
        "--dist",
        type=Path,
        default=Path("dist"),
        help="where the chart and the distributions go (relative to the repository)",
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=STAGES,
        help="only these stages (repeatable); default: all, in order",
    )
    parser.add_argument(
        "--chart-repository",
        default="",
        help="OCI repository for the chart (default: oci://<registry>/charts)",
    )
    parser.add_argument(
        "--pypi-repository-url",
        default=os.environ.get("TWINE_REPOSITORY_URL") or None,
        help="upload the distributions here instead of PyPI (e.g. TestPyPI's)",
    )
    parser.add_argument("--helm", default="helm", help="the helm binary")
    parser.add_argument(
        "--dry-run", action="store_true", help="print every command, in order, and run none"
    )
    parser.add_argument(
        "--images-json",
        action="store_true",
        help="print the images as JSON ({target, reference, base} each) and run nothing",
    )


def _release(args: argparse.Namespace) -> int:
    try:
        dockerfile = (REPOSITORY / "Dockerfile").read_text()
        release = Release(
            registry=args.registry,
            version=args.version or repository_version(),
            base=args.base or default_base(dockerfile),
            dist=(REPOSITORY / args.dist).resolve(),
            chart_repository=args.chart_repository,
            pypi_repository_url=args.pypi_repository_url,
            helm=args.helm,
            stages=tuple(args.only or STAGES),
        )
        steps = plan(release)
    except ReleaseError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.images_json:
        references = image_references(release.registry, release.version)
        images = [
            {"target": target, "reference": reference, "base": release.base}
            for target, reference in references.items()
        ]
        print(json.dumps(images, separators=(",", ":")))
        return 0
    if "@sha256:" not in release.base and "images" in release.stages:
        print(f"note: BASE {release.base} is not pinned by digest", file=sys.stderr)
    if args.dry_run:
        for step in steps:
            print(step.show())
        return 0
    try:
        run(steps)
    except subprocess.CalledProcessError as error:
        print(f"error: {shlex.join(error.cmd)} exited {error.returncode}", file=sys.stderr)
        return 1
    return 0


def add_release_command(commands: Any) -> None:
    """``release`` as a subcommand of ``prefect-gpu-sandbox``."""
    parser = commands.add_parser(
        "release",
        help="publish a version: push the images, package and push the chart (OCI), upload the "
        "Python distributions (docs/releasing.md)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_arguments(parser)
    parser.set_defaults(handler=_release)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m prefect_gpu_sandbox.release", description=__doc__.split("\n")[0]
    )
    _add_arguments(parser)
    return _release(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

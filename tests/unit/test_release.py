"""The release procedure, without running it: the licence, the versions, what it would publish
and that the docs name nothing else. tests/chart/test_release.py packages the chart for real and
lints the workflows."""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.utils import canonicalize_name

from prefect_gpu_sandbox import release
from prefect_gpu_sandbox.images import IMAGES, REGISTRY
from prefect_gpu_sandbox.release import (
    DISTRIBUTIONS,
    PUBLISHED_IMAGES,
    Release,
    ReleaseError,
    chart_placeholder,
    fill_chart_text,
    image_references,
    plan,
    repository_version,
    stage_chart,
)

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "prefect-gpu-operator"
PYPROJECTS = ("pyproject.toml", "flows/pyproject.toml", "sandbox/pyproject.toml")
# The standard text of the Apache License 2.0 (https://www.apache.org/licenses/LICENSE-2.0.txt).
APACHE_2_SHA256 = "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"
REGISTRY_UNDER_TEST = "registry.example/team"


def _pyproject(path: str) -> dict[str, object]:
    return tomllib.loads((REPO / path).read_text())["project"]  # type: ignore[no-any-return]


def _release(tmp_path: Path, **overrides: object) -> Release:
    arguments: dict[str, object] = {
        "registry": REGISTRY_UNDER_TEST,
        "version": repository_version(),
        "base": "docker.io/library/python:3.11-slim-bookworm@sha256:" + "0" * 64,
        "dist": tmp_path / "dist",
        **overrides,
    }
    return Release(**arguments)  # type: ignore[arg-type]


# --- the licence ---------------------------------------------------------------------------


def _licence_of(text: str) -> str:
    """The SPDX id of a licence file, from the standard texts this project may carry."""
    if hashlib.sha256(text.encode()).hexdigest() == APACHE_2_SHA256:
        return "Apache-2.0"
    head = " ".join(text.split()[:12])
    raise AssertionError(f"LICENSE is not a standard text this test knows: {head!r}")


@pytest.mark.parametrize("path", PYPROJECTS)
def test_each_pyproject_declares_the_licence_of_the_license_file(path: str) -> None:
    assert _pyproject(path)["license"] == _licence_of((REPO / "LICENSE").read_text())


def test_the_chart_declares_no_other_licence_and_the_release_ships_the_file(
    tmp_path: Path,
) -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    declared = (chart.get("annotations") or {}).get("artifacthub.io/license")
    assert declared in {None, _licence_of((REPO / "LICENSE").read_text())}
    staged = stage_chart(REGISTRY_UNDER_TEST, tmp_path)
    assert (staged / "LICENSE").read_bytes() == (REPO / "LICENSE").read_bytes()


def test_a_changed_licence_text_is_not_taken_for_apache() -> None:
    text = (REPO / "LICENSE").read_text().replace("irrevocable", "revocable", 1)
    with pytest.raises(AssertionError, match="not a standard text"):
        _licence_of(text)


def test_image_labels_carry_the_declared_licence(tmp_path: Path) -> None:
    licence = _pyproject("pyproject.toml")["license"]
    images = [step for step in plan(_release(tmp_path)) if step.stage == "images"]
    assert images
    assert all(f"org.opencontainers.image.licenses={licence}" in step.argv for step in images)


# --- versions and what is published --------------------------------------------------------


def test_every_published_version_is_the_chart_version_and_app_version() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    versions = {_pyproject(f"{d}/pyproject.toml")["version"] for d in DISTRIBUTIONS.values()}
    assert versions == {chart["version"]} == {chart["appVersion"]} == {repository_version()}


def _fake_repository(root: Path, operator: str, flows: str, chart: str) -> Path:
    for directory, version in ((".", operator), ("flows", flows)):
        (root / directory).mkdir(parents=True, exist_ok=True)
        (root / directory / "pyproject.toml").write_text(f'[project]\nversion = "{version}"\n')
    (root / "charts/prefect-gpu-operator").mkdir(parents=True)
    (root / "charts/prefect-gpu-operator/Chart.yaml").write_text(
        f"version: {chart}\nappVersion: '{chart}'\n"
    )
    return root


def test_versions_that_disagree_are_named(tmp_path: Path) -> None:
    repository = _fake_repository(tmp_path, operator="1.2.0", flows="1.2.0", chart="1.1.0")
    with pytest.raises(ReleaseError, match=r"Chart.yaml version = 1\.1\.0.*appVersion = 1\.1\.0"):
        repository_version(repository)
    same = _fake_repository(tmp_path / "same", operator="2.0.0", flows="2.0.0", chart="2.0.0")
    assert repository_version(same) == "2.0.0"


def test_a_version_other_than_the_repository_s_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ReleaseError, match="bump them together"):
        plan(_release(tmp_path, version="99.0.0"))


@pytest.mark.parametrize("registry", ["", "https://ghcr.io/acme", "ghcr.io/acme/", "a b"])
def test_a_registry_must_be_a_plain_reference(tmp_path: Path, registry: str) -> None:
    with pytest.raises(ReleaseError, match="--registry"):
        plan(_release(tmp_path, registry=registry))


def test_published_distributions_are_every_pyproject_but_the_sandbox() -> None:
    found = {
        path.parent.relative_to(REPO).as_posix()
        for path in REPO.glob("**/pyproject.toml")
        if not {".git", "node_modules", "dist", "build"} & set(path.relative_to(REPO).parts)
    }
    assert found == {*DISTRIBUTIONS.values(), "sandbox"}
    for name, directory in DISTRIBUTIONS.items():
        assert _pyproject(f"{directory}/pyproject.toml")["name"] == name
    # Each image installs a published distribution, so what runs in it is on PyPI too.
    assert {str(Path(spec.project).parent) for spec in IMAGES.values()} <= {*DISTRIBUTIONS.values()}


# --- the plan ------------------------------------------------------------------------------


def _tags(steps: list[release.Step]) -> list[str]:
    return [step.argv[step.argv.index("--tag") + 1] for step in steps if step.stage == "images"]


def test_the_release_pushes_exactly_the_images_the_filled_chart_names(tmp_path: Path) -> None:
    steps = plan(_release(tmp_path))
    staged = stage_chart(REGISTRY_UNDER_TEST, tmp_path / "chart")
    values = yaml.safe_load((staged / "values.yaml").read_text())
    app_version = yaml.safe_load((staged / "Chart.yaml").read_text())["appVersion"]
    operator, worker = values["operator"]["image"], values["inferenceWorker"]["image"]
    chart_names = {
        f"{operator['repository']}:{operator['tag'] or app_version}",
        f"{worker['repository']}:{worker['tag'] or app_version}",
        # values.yaml: the CUDA worker is the worker's repository tagged <appVersion>-cuda.
        f"{worker['repository']}:{app_version}-cuda",
    }
    assert set(_tags(steps)) == chart_names
    assert sorted(_tags(steps)) == sorted(
        image_references(REGISTRY_UNDER_TEST, app_version).values()
    )


def test_the_checkout_chart_names_the_placeholder_the_offline_builder_uses() -> None:
    # One placeholder: the chart's defaults are the names the sandbox imports its archives under.
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert chart_placeholder(values) == REGISTRY


def test_every_image_is_built_from_the_dockerfile_on_a_pinnable_base(tmp_path: Path) -> None:
    base = "docker.io/library/python:3.11-slim-bookworm@sha256:" + "1" * 64
    steps = [s for s in plan(_release(tmp_path, base=base)) if s.stage == "images"]
    assert [s.argv[s.argv.index("--target") + 1] for s in steps] == list(IMAGES)
    for step in steps:
        assert step.argv[:3] == ("docker", "buildx", "build")
        assert step.argv[step.argv.index("--file") + 1] == "Dockerfile"
        assert step.argv[step.argv.index("--build-arg") + 1] == f"BASE={base}"
        assert "--push" in step.argv


def test_the_default_base_is_the_dockerfile_s() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    assert f"ARG BASE={release.default_base(dockerfile)}\n" in dockerfile
    with pytest.raises(ReleaseError, match="ARG BASE"):
        release.default_base("FROM scratch\n")


def test_the_plan_pushes_images_then_the_chart_then_the_distributions(tmp_path: Path) -> None:
    steps = plan(_release(tmp_path))
    stages = [step.stage for step in steps]
    assert stages == sorted(stages, key=["images", "chart", "python"].index)
    commands = [step.show() for step in steps]
    archive = tmp_path / "dist" / f"prefect-gpu-operator-{repository_version()}.tgz"
    assert f"helm push {archive} oci://{REGISTRY_UNDER_TEST}/charts" in commands
    builds = [s.argv[-1] for s in steps if s.argv[1:3] == ("-m", "build")]
    assert builds == list(DISTRIBUTIONS.values())
    upload = next(s for s in steps if s.argv[1:4] == ("-m", "twine", "upload"))
    version = repository_version()
    assert {Path(a).name for a in upload.argv[4:]} == {
        f"{name.replace('-', '_')}-{version}{suffix}"
        for name in DISTRIBUTIONS
        for suffix in ("-py3-none-any.whl", ".tar.gz")
    }
    assert not any("sandbox" in command for command in commands)


def test_only_chooses_stages_and_a_repository_url_goes_to_twine(tmp_path: Path) -> None:
    url = "https://test.pypi.org/legacy/"
    steps = plan(_release(tmp_path, stages=("python",), pypi_repository_url=url))
    assert {step.stage for step in steps} == {"python"}
    upload = next(s for s in steps if "upload" in s.argv)
    assert upload.argv[upload.argv.index("--repository-url") + 1] == url


def test_dry_run_prints_every_command_and_runs_none(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no docker, helm or twine to run by mistake
    dist = tmp_path / "dist"
    assert release.main(["--registry", REGISTRY_UNDER_TEST, "--dist", str(dist), "--dry-run"]) == 0
    printed = capsys.readouterr().out.splitlines()
    expected = plan(
        _release(tmp_path, base=release.default_base((REPO / "Dockerfile").read_text()))
    )
    assert printed == [step.show() for step in expected]
    assert not dist.exists()
    assert all(shlex.split(line) for line in printed)


def test_images_json_is_the_workflow_s_matrix(capsys: pytest.CaptureFixture[str]) -> None:
    assert release.main(["--registry", REGISTRY_UNDER_TEST, "--images-json"]) == 0
    images = json.loads(capsys.readouterr().out)
    version = repository_version()
    assert {i["target"]: i["reference"] for i in images} == image_references(
        REGISTRY_UNDER_TEST, version
    )
    assert {i["base"] for i in images} == {release.default_base((REPO / "Dockerfile").read_text())}


def test_errors_are_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert release.main(["--registry", "https://x", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --registry")
    assert err.count("\n") == 1


def test_the_sandbox_cli_has_the_release_command(capsys: pytest.CaptureFixture[str]) -> None:
    from prefect_gpu_sandbox.cli import main

    assert main(["release", "--registry", REGISTRY_UNDER_TEST, "--dry-run", "--only", "chart"]) == 0
    assert "helm package" in capsys.readouterr().out


def test_the_release_module_needs_only_pyyaml_and_packaging() -> None:
    # The release workflow runs it with those two installed, not the sandbox's dependencies.
    probe = (
        "import sys, json; import prefect_gpu_sandbox.release; "
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    loaded = set(json.loads(result.stdout))
    # Private names are the interpreter's and the editable installs' (finders, C extensions).
    third_party = {
        name
        for name in loaded - set(sys.stdlib_module_names)
        if not name.startswith("_") and name not in {"cython_runtime", "prefect_gpu_sandbox"}
    }
    assert third_party == {"yaml", "packaging"}


# --- staging the chart ---------------------------------------------------------------------


def test_fill_replaces_only_the_placeholder_s_image_repositories() -> None:
    text = (
        "home: https://github.com/prefect-gpu-operator/prefect-gpu-operator\n"
        "  # -- Operator image repository.\n"
        "  repository: ghcr.io/prefect-gpu-operator/prefect-gpu-operator\n"
        "  repository: ghcr.io/prefect-gpu-operator/prefect-gpu-worker\n"
        '| x | `"ghcr.io/prefect-gpu-operator/prefect-gpu-worker"` |\n'
        "  other: xghcr.io/prefect-gpu-operator/prefect-gpu-worker\n"
        "  other: ghcr.io/prefect-gpu-operator/something-else\n"
    )
    filled = fill_chart_text(text, "ghcr.io/prefect-gpu-operator", "r.example/a")
    assert filled.splitlines() == [
        "home: https://github.com/prefect-gpu-operator/prefect-gpu-operator",
        "  # -- Operator image repository.",
        "  repository: r.example/a/prefect-gpu-operator",
        "  repository: r.example/a/prefect-gpu-worker",
        '| x | `"r.example/a/prefect-gpu-worker"` |',
        "  other: xghcr.io/prefect-gpu-operator/prefect-gpu-worker",
        "  other: ghcr.io/prefect-gpu-operator/something-else",
    ]


def test_a_chart_whose_images_name_two_registries_is_refused() -> None:
    values = {
        "operator": {"image": {"repository": "a.example/prefect-gpu-operator"}},
        "inferenceWorker": {"image": {"repository": "b.example/prefect-gpu-worker"}},
    }
    with pytest.raises(ReleaseError, match="several registries"):
        chart_placeholder(values)
    values["inferenceWorker"]["image"]["repository"] = "a.example/other"
    with pytest.raises(ReleaseError, match=r"inferenceWorker\.image\.repository"):
        chart_placeholder(values)


def test_the_staged_chart_differs_from_the_checkout_only_in_its_image_registry(
    tmp_path: Path,
) -> None:
    staged = stage_chart(REGISTRY_UNDER_TEST, tmp_path)
    checkout = {p.relative_to(CHART): p for p in CHART.rglob("*") if p.is_file()}
    copied = {p.relative_to(staged): p for p in staged.rglob("*") if p.is_file()}
    assert set(copied) == {*checkout, Path("LICENSE")}
    for relative, source in checkout.items():
        before, after = source.read_text(), copied[relative].read_text()
        assert after == before.replace(f"{REGISTRY}/", f"{REGISTRY_UNDER_TEST}/"), relative
    assert REGISTRY not in (staged / "values.yaml").read_text()
    # Staging again replaces the earlier copy.
    assert stage_chart("other.example/x", tmp_path) == staged
    assert "other.example/x/prefect-gpu-operator" in (staged / "values.yaml").read_text()


# --- the docs name only what the release publishes -----------------------------------------


def _docs() -> dict[str, str]:
    paths = [
        REPO / "README.md",
        REPO / "CONTRIBUTING.md",
        REPO / "flows" / "README.md",
        *sorted((REPO / "docs").glob("**/*.md")),
    ]
    return {p.relative_to(REPO).as_posix(): p.read_text() for p in paths if p.exists()}


# Tools the docs tell a maintainer to install for the release itself.
_THIRD_PARTY_PIP = {"build", "twine"}


def _extras(distribution: str) -> set[str]:
    project = _pyproject(f"{DISTRIBUTIONS[distribution]}/pyproject.toml")
    return set(project.get("optional-dependencies", {}))  # type: ignore[call-overload]


def unknown_names(text: str) -> list[str]:
    """The pip packages, extras, images and charts that ``text`` names and the release does
    not publish."""
    problems = []
    for command in re.findall(r"pip install ([^\n`#|]+)", text):
        for word in shlex.split(command.replace("\\", " ")):
            if word.startswith("-") or word.startswith((".", "/", "<")) or "://" in word:
                continue
            match = re.fullmatch(r"([A-Za-z0-9._-]+)(?:\[([^\]]*)\])?(?:[=<>!~].*)?", word)
            if match is None:
                problems.append(f"pip install {word}: not a package name")
                continue
            name = canonicalize_name(match.group(1))
            if name in _THIRD_PARTY_PIP:
                continue
            if name not in DISTRIBUTIONS:
                problems.append(f"pip install {word}: not a published distribution")
                continue
            for extra in filter(None, (match.group(2) or "").split(",")):
                if extra.strip() not in _extras(name):
                    problems.append(f"pip install {word}: {name} has no extra {extra!r}")
    for image in re.findall(r"[\w.<>-]+(?:/[\w.<>-]+)*/(prefect-gpu-[\w-]+):", text):
        if image not in PUBLISHED_IMAGES:
            problems.append(f"image {image}: not one the release pushes")
    for chart in re.findall(r"oci://[^\s`]+/charts/([\w-]+)", text):
        if chart != CHART.name:
            problems.append(f"chart {chart}: not the one the release pushes")
    return problems


@pytest.mark.parametrize("name", list(_docs()))
def test_the_docs_name_only_what_the_release_publishes(name: str) -> None:
    assert unknown_names(_docs()[name]) == []


def test_unknown_names_catches_what_the_release_does_not_make() -> None:
    text = (
        "pip install 'prefect-gpu-operator[inference]'\n"
        "pip install prefect-gpu-sandbox\n"
        "pip install 'prefect-gpu-flows[cuda]' build twine ./flows\n"
        "image: <registry>/prefect-gpu-worker:0.1.0-cuda and ghcr.io/x/prefect-gpu-agent:1\n"
        "helm install x oci://<registry>/charts/prefect-gpu-operator and oci://r/charts/other\n"
    )
    assert unknown_names(text) == [
        "pip install prefect-gpu-operator[inference]: prefect-gpu-operator has no extra "
        "'inference'",
        "pip install prefect-gpu-sandbox: not a published distribution",
        "image prefect-gpu-agent: not one the release pushes",
        "chart other: not the one the release pushes",
    ]


def test_releasing_doc_shows_the_dry_run() -> None:
    doc = (REPO / "docs" / "releasing.md").read_text()
    assert "prefect-gpu-sandbox release --registry" in doc
    assert "--dry-run" in doc
    for reference in image_references("<registry>", "<version>").values():
        assert reference in doc

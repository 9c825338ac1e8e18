"""The images install the project the way `make install` does (constraints, same package spec, no editable or test
extra), on the Python version the project targets, and keep the build context small."""

from __future__ import annotations

import re
import shlex
import tomllib

import pytest
from infra_paths import REPO

DOCKER = REPO / "infra" / "docker"
PYTORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
_NOISE = {"-q", "--quiet", "--progress-bar", "off", "--upgrade", "-U"}


def instructions(path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", path.read_text())
    result = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def _installs_in(run: str) -> list[list[str]]:
    found = []
    for command in re.split(r"&&|;", run):
        words = shlex.split(command)
        if len(words) > 2 and words[0].endswith("pip") and words[1] == "install":
            found.append(words[2:])
    return found


def pip_installs(path) -> list[list[str]]:
    """Each `pip install ...` of the RUN lines, as words."""
    return [args for keyword, rest in instructions(path) if keyword == "RUN" for args in _installs_in(rest)]


def _makefile_install() -> list[str]:
    recipe_lines = (REPO / "Makefile").read_text().replace("\\\n", " ").splitlines()  # continuations joined
    for line in recipe_lines:
        if line.lstrip().startswith("#"):
            continue
        words = shlex.split(line.strip())
        if "install" in words and "-c" in words and "-e" in words:
            return words[words.index("install") + 1 :]
    raise AssertionError("no `pip install -c ... -e ...` line in the Makefile")


def _essentials(args: list[str]) -> tuple[list[str], str]:
    """(constraint options, package spec without extras) of pip install arguments."""
    args = [a for a in args if a not in _NOISE and a != "-e"]
    constraints = [f"-c {args[i + 1]}" for i, a in enumerate(args) if a == "-c"]
    package = args[-1]
    return constraints, re.sub(r"\[.*\]$", "", package)


def _project_install(path) -> list[str]:
    installs = [args for args in pip_installs(path) if args and args[-1].split("[")[0] in (".", "/src")]
    assert len(installs) == 1, f"{path.name}: expected one install of the project, found {installs}"
    return installs[0]


@pytest.mark.parametrize(
    "name, extras, constraints",
    [("Dockerfile.cpu", None, "constraints.txt"), ("Dockerfile.gpu", "vllm", "constraints-gpu.txt")],
)
def test_image_installs_the_project_like_make_install(name, extras, constraints):
    path = DOCKER / name
    install = _project_install(path)
    make_constraints, make_package = _essentials(_makefile_install())
    assert make_constraints == ["-c constraints.txt"]
    # The GPU set differs only in its constraints file: vLLM pins its own torch and transformers.
    assert _essentials(install) == ([f"-c {constraints}"], make_package)
    assert "-e" not in install, "images install the package, not an editable checkout"
    package = install[-1]
    assert package == (f".[{extras}]" if extras else "."), package
    if extras:
        extras_declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
        assert extras in extras_declared
    steps = instructions(path)
    copy_all = steps.index(("COPY", ". ."))
    project_step = next(i for i, (k, rest) in enumerate(steps) if k == "RUN" and install in _installs_in(rest))
    assert copy_all < project_step


def test_cpu_image_takes_cpu_torch_at_the_pinned_versions():
    torch_installs = [a for a in pip_installs(DOCKER / "Dockerfile.cpu") if "torch" in a]
    assert len(torch_installs) == 1
    args = torch_installs[0]
    assert args[args.index("--index-url") + 1] == PYTORCH_CPU_INDEX
    assert args[args.index("-c") + 1] == "constraints.txt"
    pinned = {line.split("==")[0] for line in (REPO / "constraints.txt").read_text().splitlines() if "==" in line}
    packages = [a for a in args if not a.startswith("-") and a not in (PYTORCH_CPU_INDEX, "constraints.txt")]
    assert packages and set(packages) <= pinned, "every CPU wheel taken from the PyTorch index is pinned"
    steps = instructions(DOCKER / "Dockerfile.cpu")
    torch_step = next(i for i, (k, rest) in enumerate(steps) if k == "RUN" and PYTORCH_CPU_INDEX in rest)
    assert steps.index(("COPY", "constraints.txt ./")) < torch_step < steps.index(("COPY", ". ."))


def test_gpu_image_takes_its_wheels_from_pypi():
    assert not any("--index-url" in a or "--extra-index-url" in a for a in pip_installs(DOCKER / "Dockerfile.gpu"))
    (base,) = [rest for keyword, rest in instructions(DOCKER / "Dockerfile.gpu") if keyword == "FROM"]
    assert base.startswith("nvidia/cuda:")


def test_both_images_run_the_python_the_project_targets():
    # Ray refuses worker nodes whose Python differs from the head's, so the two images must agree.
    floor = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"].lstrip(">=")
    (cpu_base,) = [rest for keyword, rest in instructions(DOCKER / "Dockerfile.cpu") if keyword == "FROM"]
    assert cpu_base.startswith(f"python:{floor}-")
    gpu_text = (DOCKER / "Dockerfile.gpu").read_text()
    assert f"python{floor} -m venv" in gpu_text and f"python{floor}-venv" in gpu_text


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_images_have_what_kuberay_and_the_launcher_call(name):
    runs = " ".join(rest for keyword, rest in instructions(DOCKER / name) if keyword == "RUN")
    for tool in ("wget", "rsync"):
        assert re.search(rf"apt-get install[^&]*\b{tool}\b", runs), f"{name} lacks {tool}"
    assert "ENTRYPOINT" not in {k for k, _ in instructions(DOCKER / name)}, "KubeRay sets the container command"


def test_dockerignore_keeps_the_context_small_but_complete():
    ignored = {
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", "tests", "infra"} <= ignored
    needed = {"pyproject.toml", "constraints.txt", "README.md", "pipelines", "serving", "jobs"}
    assert not needed & ignored
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    assert not {p.rstrip("*") for p in packages} & ignored


def test_readme_gpu_install_line_is_the_gpu_image_s():
    install = _project_install(DOCKER / "Dockerfile.gpu")
    line = "pip install " + " ".join(shlex.quote(a) for a in install)
    assert line == "pip install -c constraints-gpu.txt '.[vllm]'"
    assert f"\n  {line}\n" in (REPO / "README.md").read_text()

"""environment.yml, pyproject.toml and the Makefile name the same packages and the same torch."""

import re
import tomllib
from pathlib import Path

import yaml  # a dependency of transformers, so always installed with interplab
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _environment() -> dict:
    return yaml.safe_load((ROOT / "environment.yml").read_text())


def _pip_section(env: dict) -> list[str]:
    sections = [item["pip"] for item in env["dependencies"] if isinstance(item, dict) and "pip" in item]
    assert len(sections) == 1, "environment.yml needs exactly one `- pip:` list"
    return sections[0]


def _requirements(lines) -> dict[str, Requirement]:
    reqs = [Requirement(line) for line in lines]
    return {canonicalize_name(r.name): r for r in reqs}


def _makefile_torch() -> Requirement:
    (pin,) = re.findall(r"^TORCH\s*:=\s*(\S+)", (ROOT / "Makefile").read_text(), flags=re.MULTILINE)
    return Requirement(pin)


def test_environment_lists_pyproject_dependencies_and_dev_extra():
    project = _pyproject()["project"]
    declared = _requirements(project["dependencies"] + project["optional-dependencies"]["dev"])
    pip = _pip_section(_environment())
    listed = _requirements(line for line in pip if not line.startswith("-"))
    assert sorted(listed) == sorted(declared)
    for name, requirement in listed.items():
        if name != "torch":
            assert requirement.specifier == declared[name].specifier, name


def test_environment_installs_the_package_with_dev_extra():
    pip = _pip_section(_environment())
    assert "-e .[dev]" in pip
    packages = [line for line in pip if not line.startswith("-")]
    assert Requirement(packages[0]).name == "torch"  # first, as in the Makefile


def test_torch_pin_matches_makefile_and_pyproject():
    project = _pyproject()["project"]
    torch_range = _requirements(project["dependencies"])["torch"].specifier
    pinned = _makefile_torch()
    env_torch = _requirements(line for line in _pip_section(_environment()) if line.startswith("torch"))["torch"]
    assert env_torch.specifier == pinned.specifier
    (version,) = [s.version for s in pinned.specifier if s.operator == "=="]
    assert version in torch_range


def test_conda_python_and_channel():
    env = _environment()
    assert env["channels"] == ["conda-forge"]
    (python,) = [d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python")]
    version = python.split("=", 1)[1]
    assert SpecifierSet(_pyproject()["project"]["requires-python"]).contains(version + ".0")


def test_organisms_never_import_tasks():
    """One direction: `tasks` reads the organisms' word lists; nothing in `organisms` imports `tasks`
    (the behaviour measurements that need both live above them, in `interplab.behaviour`)."""
    import ast
    from pathlib import Path

    import interplab

    # __main__.py is the command line, above the library
    allowed = {"__main__.py"}
    for path in sorted((Path(interplab.__file__).parent / "organisms").glob("*.py")):
        if path.name in allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module or ''}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                parts = name.strip(".").split(".")
                assert "tasks" not in parts and "behaviour" not in parts, f"{path.name} imports {name}"

"""requirements.lock, environment.yml, pyproject.toml and the Makefile agree: one torch, one lock, and the
lock's exact versions inside pyproject's ranges."""

import re
import tomllib
from pathlib import Path

import pytest
import yaml  # a dependency of transformers, so always installed with interplab
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _declared() -> list[Requirement]:
    """pyproject's dependencies and its dev extra: what `make install` promises."""
    project = _pyproject()["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]


def _pip_section(env: dict) -> list[str]:
    sections = [item["pip"] for item in env["dependencies"] if isinstance(item, dict) and "pip" in item]
    assert len(sections) == 1, "environment.yml needs exactly one `- pip:` list"
    return sections[0]


def _makefile_torch() -> Requirement:
    (pin,) = re.findall(r"^TORCH\s*:=\s*(\S+)", (ROOT / "Makefile").read_text(), flags=re.MULTILINE)
    return Requirement(pin)


def parse_lock(text: str) -> dict[str, Version]:
    """`name==version` lines (comments and blank lines skipped) as {canonical name: version}."""
    pins = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
        assert match, f"requirements.lock line {number} is not an exact pin `name==version`: {line!r}"
        pins[canonicalize_name(match[1])] = Version(match[2])
    return pins


def lock_problems(pins: dict[str, Version], declared: list[Requirement]) -> list[str]:
    """Every way the lock breaks pyproject: a dependency not pinned, or pinned outside its range."""
    problems = []
    for requirement in declared:
        name = canonicalize_name(requirement.name)
        if name not in pins:
            problems.append(f"{requirement.name} is a pyproject dependency but requirements.lock does not pin it")
        elif not requirement.specifier.contains(pins[name], prereleases=True):
            problems.append(f"requirements.lock pins {requirement.name}=={pins[name]}, outside pyproject's "
                            f"{requirement.specifier}")
    return problems


def _lock() -> dict[str, Version]:
    return parse_lock((ROOT / "requirements.lock").read_text())


def test_lock_pins_every_package_within_pyprojects_ranges():
    assert lock_problems(_lock(), _declared()) == []


@pytest.mark.parametrize("bad, expected", [
    ({"nnsight": Version("0.9.0")}, "pins nnsight==0.9.0, outside"),
    ({"transformers": None}, "transformers is a pyproject dependency but requirements.lock does not pin it"),
])
def test_lock_check_catches_a_bad_pin(bad, expected):
    pins = _lock() | bad
    pins = {name: version for name, version in pins.items() if version is not None}
    assert any(expected in problem for problem in lock_problems(pins, _declared()))


def test_lock_rejects_a_range():
    with pytest.raises(AssertionError, match="not an exact pin"):
        parse_lock("torch==2.13.0\nnnsight>=0.8\n")


def test_lock_torch_is_the_makefile_pin_and_within_pyproject():
    (version,) = [s.version for s in _makefile_torch().specifier if s.operator == "=="]
    assert _lock()["torch"] == Version(version)
    torch_range = [r for r in _declared() if r.name == "torch"][0].specifier
    assert version in torch_range


def test_makefile_installs_torch_then_the_lock_then_interplab_without_deps():
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile[makefile.index("$(STAMP): pyproject.toml $(LOCK)"):makefile.index("install: $(STAMP)")]
    steps = [recipe.index(s) for s in ("install --quiet $(TORCH)", "-r $(LOCK)", "--no-deps -e .")]
    assert steps == sorted(steps)


def test_environment_installs_torch_the_lock_and_the_package():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert _pip_section(env) == [str(_makefile_torch()), "-r requirements.lock", "-e ."]
    assert env["channels"] == ["conda-forge"]
    (python,) = [d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python")]
    from packaging.specifiers import SpecifierSet

    assert SpecifierSet(_pyproject()["project"]["requires-python"]).contains(python.split("=", 1)[1] + ".0")


def test_organisms_never_import_tasks():
    """One direction: `tasks` reads the organisms' word lists; nothing in `organisms` imports `tasks`
    (the behaviour measurements that need both live above them, in `interplab.experiments.behaviour`)."""
    import ast

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

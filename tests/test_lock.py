"""requirements/lock.txt matches pyproject.toml (offline), and the package has one version and a license."""

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_lock_script():
    spec = importlib.util.spec_from_file_location("lock_script", os.path.join(ROOT, "scripts", "lock.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


lock = load_lock_script()


def pins(path: str) -> dict[str, list[str]]:
    """name -> the `==` versions the lock gives it (one per environment-marker branch)."""
    found: dict[str, list[str]] = {}
    with open(path) as f:
        for line in f:
            if line[:1].isalnum():
                name, version = line.split(";")[0].strip().split("==")
                found.setdefault(name.lower(), []).append(version)
    return found


def test_the_committed_lock_matches_pyproject():
    lock.check(ROOT)  # raises SystemExit with the re-lock command otherwise


@pytest.fixture
def project_copy(tmp_path):
    for name in ("pyproject.toml", "requirements", "scripts"):
        source = os.path.join(ROOT, name)
        (shutil.copytree if os.path.isdir(source) else shutil.copy)(source, tmp_path / name)
    return tmp_path


@pytest.mark.parametrize(
    "old, new",
    [
        ('"numpy>=1.24",', '"numpy>=1.24",\n    "requests>=2",'),  # a dependency added
        ('"pillow>=10"', '"pillow>=11"'),  # a bound changed
        ('"pytest>=8",', '"pytest>=8",\n    "hypothesis",'),  # an extra's dependency added
    ],
)
def test_a_dependency_changed_without_relocking_fails_in_one_sentence(project_copy, old, new):
    pyproject = project_copy / "pyproject.toml"
    text = pyproject.read_text()
    assert old in text
    pyproject.write_text(text.replace(old, new))
    with pytest.raises(SystemExit) as raised:
        lock.check(str(project_copy))
    message = str(raised.value)
    assert message.startswith("pyproject.toml's dependencies") and "run `python scripts/lock.py`" in message
    assert message.count(". ") == 0 and message.endswith(".")


def test_comments_and_formatting_do_not_count_as_changes(project_copy):
    pyproject = project_copy / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('"pillow>=10",', '"Pillow >= 10",  # images'))
    lock.check(str(project_copy))


def test_a_missing_lock_says_how_to_make_it(project_copy):
    os.remove(project_copy / "requirements" / "lock.txt")
    with pytest.raises(SystemExit, match=r"lock.txt is missing: run `python scripts/lock.py`"):
        lock.check(str(project_copy))


def installed_closure(root: str, extras: tuple[str, ...]) -> dict[str, str]:
    """name -> installed version of `root[extras]` and everything it requires, transitively, as the
    installed packages' own metadata says (markers evaluated here). Packages the machine had before,
    and that raytl does not need, are not in it."""
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    found: dict[str, str] = {}
    todo = [(root, extras)]
    while todo:
        name, wanted = todo.pop()
        key = canonicalize_name(name)
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue  # an optional dependency whose marker holds but that nothing installed
        if key in found and not wanted:
            continue
        found[key] = dist.version
        for line in dist.requires or []:
            requirement = Requirement(line)
            env = [{"extra": extra} for extra in wanted] or [{"extra": ""}]
            if requirement.marker is None or any(requirement.marker.evaluate(e) for e in env):
                todo.append((requirement.name, tuple(requirement.extras)))
    return found


def test_the_lock_pins_what_this_environment_runs():
    """Every package that raytl[dev] brings is installed at exactly the lock's version (CI installs into a
    Python that already has packages: those raytl does not need are not the lock's business)."""
    from packaging.utils import canonicalize_name

    locked: dict[str, set[str]] = {}
    for name, versions in pins(os.path.join(ROOT, lock.LOCK)).items():
        locked.setdefault(canonicalize_name(name), set()).update(versions)
    closure = installed_closure("raytl", ("dev",))
    assert {"ray", "torch", "torchvision", "pyarrow", "moto", "pytest"} <= closure.keys()
    drift = {name: (v, sorted(locked.get(name, ()))) for name, v in closure.items() if name != "raytl"}
    assert {name: d for name, d in drift.items() if d[0] not in d[1]} == {}
    assert len(closure) > 100  # ray, torch, their dependencies and the dev tools


def test_torch_and_torchvision_are_locked_as_the_tested_pair():
    locked = pins(os.path.join(ROOT, lock.LOCK))
    assert locked["torch"] == ["2.14.1"] and locked["torchvision"] == ["0.29.1"]
    assert locked["ray"] == ["2.60.0"]


def test_one_version_and_the_license():
    import raytl

    out = subprocess.run(
        [sys.executable, "-m", "raytl.cli", "--version"], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == f"raytl {raytl.__version__}"
    from importlib.metadata import metadata

    meta = metadata("raytl")
    assert meta["Version"] == raytl.__version__
    assert meta["License-Expression"] == "Apache-2.0"
    with open(os.path.join(ROOT, "LICENSE")) as f:
        assert "Apache License" in f.readline() + f.readline() and "Version 2.0" in f.read(200)

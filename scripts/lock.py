"""Refresh requirements/lock.txt from pyproject.toml with uv, or check (offline) that it still matches.

    python scripts/lock.py          # re-lock after any change to pyproject.toml's dependencies or extras,
                                    # or to requirements/tested.txt: the lock's versions stay where they can
    python scripts/lock.py --upgrade  # re-lock afresh: newest releases, on purpose
    python scripts/lock.py --check  # what tests/test_lock.py runs: no network

The lock is one file of exact versions for every package that raytl and all its extras need, on
Linux, macOS and Windows and Python 3.10 to 3.12 (uv's universal resolution writes environment markers
where versions differ). It is used as a pip *constraints* file (`pip install -c requirements/lock.txt
-e ".[dev]"`): it fixes the versions but does not decide what is installed, so the same file serves a
cluster node (runtime only) and a development machine (with `[dev]`). It carries no hashes: pip's hash
checking cannot cover the editable install of raytl itself, and constraints files do not switch it on.
The first line of the lock holds a digest of its inputs, which `--check` recomputes.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCK = os.path.join("requirements", "lock.txt")
TESTED = os.path.join("requirements", "tested.txt")
PYTHON_FLOOR = "3.10"  # the lock covers this Python and every newer one that the packages support
DIGEST_PREFIX = "# inputs-sha256: "
RELOCK = "python scripts/lock.py"


def inputs_digest(root: str = ROOT) -> str:
    """sha256 of what the lock is resolved from: pyproject's requirements (normalised), tested.txt's pins."""
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    lines = [f"requires-python {project.get('requires-python', '')}"]
    lines += sorted(f"dependency {_normal(r)}" for r in project.get("dependencies", []))
    for extra, reqs in sorted(project.get("optional-dependencies", {}).items()):
        lines += sorted(f"extra {extra} {_normal(r)}" for r in reqs)
    lines += sorted(f"tested {_normal(r)}" for r in _requirement_lines(os.path.join(root, TESTED)))
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _normal(text: str) -> str:
    """A requirement in one spelling: `Pillow >= 10` and `pillow>=10` are the same input."""
    requirement = Requirement(text)
    extras = f"[{','.join(sorted(requirement.extras))}]" if requirement.extras else ""
    marker = f"; {requirement.marker}" if requirement.marker else ""
    return f"{canonicalize_name(requirement.name)}{extras}{requirement.specifier}{marker}"


def _requirement_lines(path: str) -> list[str]:
    with open(path) as f:
        return [line.split("#")[0].strip() for line in f if line.split("#")[0].strip()]


def check(root: str = ROOT) -> None:
    """Raise SystemExit with one sentence when the lock is missing or was made from other inputs."""
    path = os.path.join(root, LOCK)
    if not os.path.exists(path):
        raise SystemExit(f"{LOCK} is missing: run `{RELOCK}` to make it.")
    with open(path) as f:
        first = f.readline().strip()
    recorded = first[len(DIGEST_PREFIX) :] if first.startswith(DIGEST_PREFIX) else None
    if recorded != inputs_digest(root):
        raise SystemExit(
            f"pyproject.toml's dependencies (or {TESTED}) changed since {LOCK} was made: "
            f"run `{RELOCK}` to re-lock, and commit both."
        )


def relock(root: str = ROOT, upgrade: bool = False) -> None:
    """Resolve every dependency and extra with uv (keeping the lock's versions unless `upgrade`) and write
    the lock with its inputs' digest."""
    uv = shutil.which("uv") or shutil.which("uv", path=os.path.dirname(sys.executable))
    if uv is None:
        raise SystemExit('uv is not installed: `pip install -c requirements/lock.txt -e ".[dev]"` brings it.')
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "lock.txt")
        if not upgrade and os.path.exists(os.path.join(root, LOCK)):
            # uv keeps the versions of an existing output file where the inputs allow: no bump by the way
            shutil.copy(os.path.join(root, LOCK), out)
        command = [
            uv, "pip", "compile", "pyproject.toml", "--all-extras", "--universal",
            "--python-version", PYTHON_FLOOR, "--constraint", TESTED, "--output-file", out,
            "--custom-compile-command", RELOCK, "--quiet",
        ]  # fmt: skip
        subprocess.run(command, cwd=root, check=True)
        with open(out) as f:
            body = f.read()
    with open(os.path.join(root, LOCK), "w") as f:
        f.write(f"{DIGEST_PREFIX}{inputs_digest(root)}\n{body}")
    print(f"wrote {LOCK}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that the lock matches its inputs")
    parser.add_argument("--upgrade", action="store_true", help="newest releases, not the lock's versions")
    args = parser.parse_args()
    if args.check:
        check()
        print(f"{LOCK} matches pyproject.toml")
    else:
        relock(upgrade=args.upgrade)


if __name__ == "__main__":
    main()

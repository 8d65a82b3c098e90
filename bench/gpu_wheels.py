"""The wheels a lent GPU machine lacks, for `bench/gpu.sh` there: Ray and what it and raytl import.

    python bench/gpu_wheels.py                    # cp312 wheels into .gpu/wheels (ignored), sizes checked
    python bench/gpu_wheels.py --python 3.11      # the same set for this machine's Python (the dry run)

The device image (device tool's KINDS.md) has torch, torchvision, numpy, pandas, pyarrow, fsspec, pillow,
scikit-learn, requests, pyyaml, protobuf, msgpack, click, filelock, aiohttp, grpcio and more, but no Ray
and none of what CARRY names. Versions come from requirements/lock.txt (its line for that Python).

Ray's wheel (79 MB for cp312) is over the 64 MiB one device call carries; 31 MB of it is
`ray/jars/ray_dist.jar`, the Java worker, which a Python job never starts. Dropping it (and the dashboard
bundle's source map) leaves ~46 MB, so everything travels in one call and no split wheel has to survive
between two calls on a warm machine.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import zipfile
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
# Missing from the device image and imported by `import ray, ray.data, ray.train.torch` or raytl's commands
# (checked by the dry run: a venv with only the image's packages, these installed with --target).
CARRY = [
    "ray",
    "jsonschema",
    "jsonschema-specifications",
    "referencing",
    "rpds-py",
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
    "colorful",
    "braceexpand",
]
# Paths inside Ray's wheel that a Python job never reads.
DROP = ("ray/jars/", ".js.map")
CARRY_LIMIT = 60 * 1024**2  # one device call carries 64 MiB, the working tree included: a margin


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--python", default="3.12", help="the device machine's Python (3.12)")
    parser.add_argument("--dest", default=str(ROOT / ".gpu" / "wheels"))
    args = parser.parse_args()
    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.whl"):
        old.unlink()
    pins = locked(args.python)
    download([f"{name}=={pins[name]}" for name in CARRY], args.python, dest)
    (ray,) = dest.glob("ray-*.whl")
    slim(ray)
    total = sum(f.stat().st_size for f in dest.glob("*.whl"))
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    tree = sum((ROOT / name).stat().st_size for name in listed.decode().split("\0") if name)
    for wheel in sorted(dest.glob("*.whl")):
        print(f"{wheel.stat().st_size / 1024**2:7.1f} MiB  {wheel.name}")
    print(f"{total / 1024**2:7.1f} MiB in {dest}, {tree / 1024**2:.1f} MiB of tracked files beside them")
    if total + tree > CARRY_LIMIT:
        sys.exit(
            f"wheels and tree: {(total + tree) / 1024**2:.1f} MiB, over {CARRY_LIMIT >> 20} MiB for one call"
        )


def locked(python: str) -> dict[str, str]:
    """requirements/lock.txt's pins that apply to `python` (its lines carry markers per Python version)."""
    environment = {"python_version": python, "python_full_version": f"{python}.0", "sys_platform": "linux"}
    pins = {}
    for line in (ROOT / "requirements" / "lock.txt").read_text().splitlines():
        if not line or line[0] in " #-":
            continue
        requirement = Requirement(line)
        if requirement.marker is None or Marker(str(requirement.marker)).evaluate(environment):
            pins[requirement.name.lower()] = str(requirement.specifier).removeprefix("==")
    return pins


def download(requirements: list[str], python: str, dest: Path) -> None:
    platforms = [
        "manylinux_2_28_x86_64",
        "manylinux_2_17_x86_64",
        "manylinux2014_x86_64",
        "manylinux1_x86_64",
    ]
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
    command += ["--python-version", python, "--implementation", "cp", "-d", str(dest)]
    command += [arg for platform in platforms for arg in ("--platform", platform)]
    subprocess.run(command + requirements, check=True)


def slim(wheel: Path) -> None:
    """Rewrite the wheel without DROP's paths (and their RECORD lines), so that pip installs it as is."""
    slimmed = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(slimmed, "w", zipfile.ZIP_DEFLATED) as target:
        for item in source.infolist():
            if _dropped(item.filename):
                continue
            data = source.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                kept = [row for row in data.decode().splitlines() if not _dropped(row.split(",")[0])]
                data = ("\n".join(kept) + "\n").encode()
            target.writestr(item, data)
    slimmed.replace(wheel)


def _dropped(path: str) -> bool:
    return any(part in path for part in DROP)


if __name__ == "__main__":
    main()

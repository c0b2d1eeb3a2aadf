"""What a wheel and a source distribution carry. The Triton backend was once left out of every wheel
(its subpackage was not listed), so a wheel's users had no ``backend="triton"`` and ``auto`` quietly
chose another; an sdist lacked the tests' own helpers, so its tests could not run."""

import os
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Built without the extension: these tests are about which files go in, not about compiling.
ENV = {**os.environ, "MMKD_BUILD_NATIVE": "0"}


def _sources() -> set[str]:
    """The installed path of every module of both packages, as a wheel lays them out."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = set()
    for package, folder in config["package-dir"].items():
        for path in (REPO / folder).rglob("*.py"):
            found.add(f"{package}/{path.relative_to(REPO / folder).as_posix()}")
    return found


def test_every_package_is_listed():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = {str(Path(module).parent).replace("/", ".") for module in _sources()}
    assert packages == set(config["packages"]), "list every package, subpackages too, in pyproject.toml"


def test_a_wheel_holds_every_module(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", str(REPO),
                    "-w", str(tmp_path)], env=ENV, check=True, cwd=tmp_path, timeout=300)
    (wheel,) = tmp_path.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert _sources() <= names, sorted(_sources() - names)
    assert any(name.endswith("/licenses/LICENSE") for name in names)


def test_an_sdist_holds_what_building_and_testing_need(tmp_path):
    # egg_info into tmp_path: the checkout's own egg-info (the editable install's) is left alone.
    subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path), "sdist", "-d",
                    str(tmp_path)], env=ENV, check=True, cwd=REPO, capture_output=True, timeout=300)
    (sdist,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    wanted = {name for name in tracked if name.startswith(("csrc/", "tests/", "benchmarks/", "mmkd_kernels/",
                                                           "python/"))
              and not name.startswith("benchmarks/results/")}
    wanted |= {"Makefile", "LICENSE", "constraints.txt", "setup.py", "pyproject.toml", "README.md"}
    assert wanted <= names, sorted(wanted - names)
    assert not any(name.startswith("benchmarks/results/") for name in names)  # 4.5 MB of tables and plots

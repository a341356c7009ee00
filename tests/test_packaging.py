"""The package as a user gets it: build the wheel and the sdist, check what they contain, install
the wheel into a fresh virtual environment and use it from there."""

from __future__ import annotations

import email
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

import lightning_slim

ROOT = Path(__file__).resolve().parents[1]
VERSION = lightning_slim.__version__
# what a fresh clone has, less the build and run outputs that a working tree collects
NOT_SOURCE = shutil.ignore_patterns(
    ".git",
    ".venv",
    ".slim_cache",
    "site",
    "dist",
    "build",
    "*.egg-info",
    "__pycache__",
    ".pytest_cache",
    "lightning_logs",
    "wandb",
    "checkpoints",
)


def run(*cmd, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> dict[str, Path]:
    # build from a copy: the shared working tree gets no egg-info or build/ written into it mid-run
    source = tmp_path_factory.mktemp("source") / "lightning-slim"
    shutil.copytree(ROOT, source, symlinks=True, ignore=NOT_SOURCE)
    out = tmp_path_factory.mktemp("dist")
    # --no-isolation: use this venv's setuptools rather than fetch one (the tests run offline)
    run(sys.executable, "-m", "build", "--no-isolation", "--outdir", out, source)
    (wheel,), (sdist,) = out.glob("*.whl"), out.glob("*.tar.gz")
    return {"wheel": wheel, "sdist": sdist}


def wheel_metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as z:
        return email.message_from_string(z.read(f"lightning_slim-{VERSION}.dist-info/METADATA").decode())


def test_one_version_string():
    # the [project] table (no tomllib: Python 3.10 is supported) reads the version from __init__.py
    project = (ROOT / "pyproject.toml").read_text().split("\n[project]\n", 1)[1].split("\n[", 1)[0]
    assert re.search(r'^dynamic = \["version"\]$', project, re.M) and not re.search(r"^version\s*=", project, re.M)
    assert (ROOT / "CHANGELOG.md").read_text().count(f"## {VERSION}") == 1


def test_wheel_contents(dists):
    wheel = dists["wheel"]
    assert wheel.name == f"lightning_slim-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        shipped_license = z.read(f"lightning_slim-{VERSION}.dist-info/licenses/LICENSE")
    assert "lightning_slim/py.typed" in names
    configs = {f"lightning_slim/configs/{p.name}" for p in (ROOT / "lightning_slim" / "configs").glob("*.yaml")}
    assert len(configs) >= 10 and configs <= names, sorted(configs - names)
    cards = {p.relative_to(ROOT).as_posix() for p in (ROOT / "lightning_slim").glob("*/README.md")}
    assert len(cards) == 4 and cards <= names, sorted(cards - names)
    assert shipped_license == (ROOT / "LICENSE").read_bytes()
    assert not {n for n in names if n.split("/")[0] in ("tests", "benchmarks", "examples", "docs", "callbacks")}


def test_wheel_metadata(dists):
    meta = wheel_metadata(dists["wheel"])
    assert meta["Version"] == VERSION
    assert meta["License-Expression"] == "Apache-2.0"
    assert meta.get_all("License-File") == ["LICENSE"]
    assert meta["License"] is None, "the deprecated free-text License field is gone"
    requires = meta.get_all("Requires-Dist")
    core = [r for r in requires if "extra ==" not in r]
    assert not [r for r in core if r.startswith(("mnist1d", "scikit-learn", "torchvision", "timm"))], core
    assert all(any(c in r for c in "<>=") for r in core), f"every dependency has a version bound: {core}"
    extras = set(meta.get_all("Provides-Extra"))
    assert {"demo", "onnx", "zoo", "docs", "dev"} <= extras


def test_sdist_contents(dists):
    sdist = dists["sdist"]
    assert sdist.name == f"lightning_slim-{VERSION}.tar.gz"
    top = f"lightning_slim-{VERSION}/"
    with tarfile.open(sdist) as t:
        names = {n.removeprefix(top) for n in t.getnames()}
        pkg_info = t.extractfile(top + "PKG-INFO").read().decode()
    assert {
        "LICENSE",
        "pyproject.toml",
        "README.md",
        "lightning_slim/py.typed",
        "lightning_slim/configs/pruning.yaml",
    } <= names
    assert f"\nVersion: {VERSION}\n" in pkg_info and "\nLicense-Expression: Apache-2.0\n" in pkg_info


def test_wheel_installs_and_works_in_a_fresh_venv(dists, tmp_path):
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    run(
        sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "--quiet", dists["wheel"]
    )
    # the dependencies come from this venv: one path line, appended after the new venv's own packages
    # (a .pth line does not run the editable-install hook that sits in that folder)
    new_site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))").stdout.strip())
    (new_site / "_dev_dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    smoke = tmp_path / "smoke.py"
    smoke.write_text(
        textwrap.dedent(f"""
        import sys
        from importlib import metadata, resources
        from pathlib import Path

        import lightning.pytorch as pl
        import yaml

        import lightning_slim
        from lightning_slim import configs

        venv = Path(sys.prefix).resolve()
        assert Path(lightning_slim.__file__).resolve().is_relative_to(venv), lightning_slim.__file__
        assert lightning_slim.__version__ == metadata.version("lightning-slim") == {VERSION!r}
        assert resources.files("lightning_slim").joinpath("py.typed").is_file()
        path = configs.path("pruning")
        assert path.resolve().is_relative_to(venv) and "recipe_full_pipeline" in configs.list_configs()
        (spec,) = yaml.safe_load(path.read_text())["trainer"]["callbacks"]
        cls = getattr(lightning_slim, spec["class_path"].rsplit(".", 1)[1])
        callback = cls(**spec["init_args"])
        assert isinstance(callback, pl.Callback)
        print("built", type(callback).__name__, "from", path)
    """)
    )
    # -I: neither the current folder nor PYTHONPATH can put the source tree on sys.path
    out = run(python, "-I", smoke, cwd=tmp_path).stdout
    assert "built IterativeMagnitudePruning from" in out, out


def test_demo_data_names_the_extra_when_its_dependency_is_missing(monkeypatch):
    from lightning_slim.data import DigitsDataModule

    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # import of it now fails
    with pytest.raises(ImportError, match=r"pip install 'lightning-slim\[demo\]'"):
        DigitsDataModule().setup()


def test_min_versions_file_pins_every_lower_bound(dists):
    """`make test-min` installs .ci/min-versions.txt: it pins exactly the lower bounds the package declares."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    lower = {}
    for line in wheel_metadata(dists["wheel"]).get_all("Requires-Dist"):
        req = Requirement(line)
        if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in ("demo", "onnx", "zoo", "pretrained")):
            lower.update((req.name, Version(s.version)) for s in req.specifier if s.operator == ">=")
    pins = [line for line in (ROOT / ".ci" / "min-versions.txt").read_text().splitlines() if line[:1].isalnum()]
    pinned = {r.name: Version(next(iter(r.specifier)).version) for r in map(Requirement, pins)}
    assert pinned == lower

"""The package as a user gets it: build the wheel and the sdist, check what they contain, install
the wheel into a fresh virtual environment and use it from there."""

from __future__ import annotations

import email
import os
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

import lightning_slim
from lightning_slim.core import registry

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
    cards = {t.card.relative_to(ROOT).as_posix() for t in registry.techniques()}  # every technique's card
    assert len(cards) >= 5 and cards <= names, sorted(cards - names)
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
    assert {"torchao", "wandb", "demo", "onnx", "zoo", "docs", "dev"} <= extras


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


# a new shell's environment: nothing of this process's import path reaches the fresh venv
FRESH_ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
# what `pip install lightning-slim` must not bring: each is an extra (pyproject.toml says why)
OPTIONAL = ("torchao", "wandb", "transformers", "mnist1d", "sklearn", "gguf", "accelerate", "mkdocs")


def core_requirements(wheel: Path) -> list:
    from packaging.requirements import Requirement

    reqs = [Requirement(line) for line in wheel_metadata(wheel).get_all("Requires-Dist")]
    return [r for r in reqs if r.marker is None or r.marker.evaluate({"extra": ""})]


def dependency_closure(requirements) -> dict[str, metadata.Distribution]:
    """The installed distributions ``requirements`` need, transitively (markers and extras as pip
    evaluates them); each must be installed here in a version the requirement allows."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    found: dict[str, metadata.Distribution] = {}
    todo = list(requirements)
    while todo:
        req = todo.pop()
        dist = metadata.distribution(req.name)
        assert req.specifier.contains(dist.version, prereleases=True), f"{req} but {dist.version} is installed"
        wanted = {""} | set(req.extras)
        for line in dist.requires or []:
            sub = Requirement(line)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in wanted):
                todo.append(sub)
        found[canonicalize_name(req.name)] = dist
    return found


def install_closure(dists: dict[str, metadata.Distribution], folder: Path) -> None:
    """Make ``folder`` a site directory that holds exactly these distributions (links to their installed
    files: packages, modules and .dist-info), as `pip install` would lay them out."""
    folder.mkdir()
    for name, dist in dists.items():
        assert dist.files, f"{name} has no RECORD: cannot tell its files"
        tops = {f.parts[0] for f in dist.files if f.parts[0] not in ("..", "__pycache__")}
        for top in tops - {n for n in tops if n.endswith(".pth")}:
            target = Path(dist.locate_file(top))
            if target.exists() and not (folder / top).exists():
                (folder / top).symlink_to(target)


@pytest.fixture(scope="module")
def core_venv(dists, tmp_path_factory) -> Path:
    """A fresh venv with the built wheel and its core dependencies only, as `pip install lightning-slim`
    leaves it: no extra, nothing else that happens to be installed here (offline: the dependencies are
    this venv's installed files, linked, not downloaded)."""
    root = tmp_path_factory.mktemp("core")
    venv = root / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    pip = (sys.executable, "-m", "pip", "--python", python)
    run(*pip, "install", "--no-deps", "--no-index", "--quiet", dists["wheel"])
    closure = dependency_closure(core_requirements(dists["wheel"]))
    install_closure(closure, root / "core_site")
    new_site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))").stdout.strip())
    (new_site / "_core_dependencies.pth").write_text(str(root / "core_site") + "\n")
    # every requirement of every installed distribution is met: the closure is whole (PYTHONPATH would
    # show the new interpreter packages that are not in the venv)
    run(*pip, "check", env=FRESH_ENV)
    return venv


def test_core_install_has_no_optional_package(dists, core_venv):
    core = {r.name for r in core_requirements(dists["wheel"])}
    assert {"torch", "lightning", "onnxruntime", "onnxscript", "onnx", "torch-pruning"} <= core, core
    assert not core & {"torchao", "wandb"}, "optional runtimes are extras, not core dependencies"
    extras = set(wheel_metadata(dists["wheel"]).get_all("Provides-Extra"))
    assert {"torchao", "wandb", "demo", "onnx", "zoo", "pretrained", "docs", "dev"} <= extras
    check = f"import importlib.util as u; print([m for m in {OPTIONAL!r} if u.find_spec(m)])"
    assert run(core_venv / "bin" / "python", "-I", "-c", check).stdout.strip() == "[]"


def test_wheel_installs_and_works_in_a_fresh_venv(core_venv, tmp_path):
    python = core_venv / "bin" / "python"
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
        (spec,) = yaml.safe_load(path.read_text())["trainer"]["callbacks+"]
        cls = getattr(lightning_slim, spec["class_path"].rsplit(".", 1)[1])
        callback = cls(**spec["init_args"])
        assert isinstance(callback, pl.Callback)
        print("built", type(callback).__name__, "from", path)
    """)
    )
    # -I: neither the current folder nor PYTHONPATH can put the source tree on sys.path
    out = run(python, "-I", smoke, cwd=tmp_path).stdout
    assert "built IterativeMagnitudePruning from" in out, out
    help_text = run(core_venv / "bin" / "lightning-slim", "fit", "--help", cwd=tmp_path, env=FRESH_ENV).stdout
    assert "--trainer.callbacks" in help_text and "--config" in help_text


def test_every_callback_default_runs_with_the_core_install_alone(core_venv, tmp_path):
    """`pip install lightning-slim`, no extra: each callback with its defaults (only what it cannot do
    without: a teacher, a reference model) trains a user's module for a few steps and ends its fit,
    QAT's int8 ONNX export and the report's measurement of it included."""
    shutil.copy(ROOT / "tests" / "user_module.py", tmp_path)
    smoke = tmp_path / "smoke.py"
    smoke.write_text(
        textwrap.dedent("""
        import copy, json, sys, warnings
        from pathlib import Path

        import lightning.pytorch as pl
        import torch

        sys.path.insert(0, str(Path(__file__).parent))
        from user_module import Digits, RandomDigits
        from lightning_slim import (
            CompressionReport, IterativeMagnitudePruning, KnowledgeDistillation,
            OnlineDataSelection, QuantizationAwareTraining,
        )

        warnings.simplefilter("ignore")  # Lightning's advice for tiny runs; errors are what this checks
        teacher = Digits()
        callbacks = {
            "pruning": lambda: IterativeMagnitudePruning(),
            "quantization": lambda: QuantizationAwareTraining(export_path="int8.onnx"),
            "distillation": lambda: KnowledgeDistillation(teacher=copy.deepcopy(teacher)),
            "selection": lambda: OnlineDataSelection(reference=copy.deepcopy(teacher)),
            "report": lambda: CompressionReport(accuracy_metric="val_acc", latency_batch_size=8),
        }
        for name, make in callbacks.items():
            pl.seed_everything(0)
            model, callback = Digits(), make()
            before = {k: v.clone() for k, v in model.state_dict().items()}
            trainer = pl.Trainer(
                max_epochs=2, limit_train_batches=2, callbacks=[callback], logger=False,
                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                default_root_dir=name,
            )
            trainer.fit(model, datamodule=RandomDigits())
            assert trainer.global_step > 0, name
            assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items()), name
            print("ran", name)
        import onnx  # a core dependency: QAT's default runtime exports with it

        graph = onnx.load("int8.onnx").graph
        assert any(i.data_type == onnx.TensorProto.INT8 for i in graph.initializer), "the export holds int8 weights"
        report = json.loads(next(Path("report").rglob("compression_report.json")).read_text())
        print("report", sorted(report)[:3])
    """)
    )
    out = run(core_venv / "bin" / "python", "-I", smoke, cwd=tmp_path).stdout
    for name in ("pruning", "quantization", "distillation", "selection", "report"):
        assert f"ran {name}" in out, out


def test_demo_data_names_the_extra_when_its_dependency_is_missing(monkeypatch):
    from lightning_slim.demos.data import DigitsDataModule

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
        if req.marker is None or any(
            req.marker.evaluate({"extra": e}) for e in ("torchao", "wandb", "demo", "onnx", "zoo", "pretrained")
        ):
            lower.update((req.name, Version(s.version)) for s in req.specifier if s.operator == ">=")
    pins = [line for line in (ROOT / ".ci" / "min-versions.txt").read_text().splitlines() if line[:1].isalnum()]
    pinned = {r.name: Version(next(iter(r.specifier)).version) for r in map(Requirement, pins)}
    assert pinned == lower

"""The installed command lines, run as a user runs them: from a folder outside the checkout."""

import os
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

from fineweb_gpt.data.settings import DataSettings

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = [e.name for e in metadata.distribution("fineweb_gpt").entry_points if e.group == "console_scripts"]
OFFLINE = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}


def installed(script: str) -> Path:
    path = Path(sys.executable).parent / script
    if not path.is_file():
        pytest.fail(f"{script} is not installed beside {sys.executable}; run pip install -e . again")
    return path


# Commands whose --help loads neither torch nor Lightning (the others load torch, never Lightning).
WITHOUT_TORCH = {"fineweb-gpt-train", "fineweb-gpt-doctor", "fineweb-gpt-sweep"}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_every_console_script_answers_help_from_another_folder(script, tmp_path):
    profiled = {**OFFLINE, "PYTHONPROFILEIMPORTTIME": "1"}  # every module imported, on stderr
    result = subprocess.run(
        [installed(script), "--help"], cwd=tmp_path, env=profiled, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(result.stdout.splitlines()) >= 3 and "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir())  # asking for help writes nothing
    assert result.stdout.startswith(script) or f"usage: {script}" in result.stdout  # its own name
    if script == "fineweb-gpt-tokenize":  # options with a default say it
        assert f"(default: {DataSettings.val_fraction})" in " ".join(result.stdout.split())  # as data= holds out
        assert "(default: 100000000)" in result.stdout
    # Loading Lightning takes seconds: help answers without it.
    profile = [line for line in result.stderr.splitlines() if line.startswith("import time")]
    imported = {line.rsplit("|", 1)[-1].strip() for line in profile}
    assert "lightning" not in imported
    assert ("torch" not in imported) == (script in WITHOUT_TORCH), script


def test_train_script_composes_the_config_from_another_folder(tmp_path):
    result = subprocess.run(
        [installed("fineweb-gpt-train"), "--cfg", "job", "model=124m", "hw=rtx4070"],
        cwd=tmp_path,
        env=OFFLINE,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "n_embd: 768" in result.stdout and "peak_flops: 58300000000000.0" in result.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(REPO), "-w", str(out)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    [path] = out.glob("fineweb_gpt-*.whl")
    return path


def test_the_wheel_carries_every_module_and_the_whole_config(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {f"fineweb_gpt/{p.relative_to(REPO / 'src' / 'fineweb_gpt')}" for p in (REPO / "src").rglob("*.py")}
    configs = {f"fineweb_gpt/conf/{p.relative_to(REPO / 'conf')}" for p in (REPO / "conf").rglob("*.yaml")}
    assert modules <= names and configs <= names
    assert {"fineweb_gpt/assets/gpt2.tiktoken", "fineweb_gpt/assets/fineweb_sample10BT_800.parquet"} <= names


def test_an_installed_wheel_finds_its_config_from_any_folder(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = {**OFFLINE, "PYTHONPATH": str(site)}
    code = "from fineweb_gpt.config_files import config_dir; print(config_dir())"
    where = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert where.stdout.strip() == str(site / "fineweb_gpt" / "conf"), where.stderr
    result = subprocess.run(
        [sys.executable, "-m", "fineweb_gpt.train", "--cfg", "job"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0 and "total_batch_tokens: 4096" in result.stdout, result.stderr[-2000:]

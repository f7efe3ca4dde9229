"""Start-up checks of each model's ``requires``: free RAM and free disk."""

from __future__ import annotations

from pathlib import Path

import yaml

from gateway.config import load_config
from gateway.preflight import check_requirements, free_disk_mb, free_ram_mb

ASSETS = Path(__file__).resolve().parents[1] / "backends" / "torch" / "assets"


def config(tmp_path: Path, models: dict) -> Path:  # type: ignore[type-arg]
    (tmp_path / "jwks.json").write_text('{"keys": []}')
    data = {"auth": {"jwt": {"jwks_file": "jwks.json"}}, "models": models}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def torch_model(requires: dict) -> dict:  # type: ignore[type-arg]
    return {"requires": requires, "backend": {"type": "torch", "path": str(ASSETS / "digits.safetensors"),
                                              "arch": "digits-mlp"}}


def test_measurements_are_plausible() -> None:
    ram = free_ram_mb()
    assert ram is not None and ram > 0
    disk = free_disk_mb(ASSETS / "digits.safetensors")
    assert disk is not None and disk > 0


def test_met_requirements_give_no_problem(tmp_path: Path) -> None:
    loaded = load_config(config(tmp_path, {"digits": torch_model({"min_free_ram_mb": 1, "min_free_disk_mb": 1})}))
    assert check_requirements(loaded) == []


def test_unmet_ram_is_named(tmp_path: Path) -> None:
    loaded = load_config(config(tmp_path, {"digits": torch_model({"min_free_ram_mb": 256})}))
    assert check_requirements(loaded, ram_mb=100) == ["model digits: requires 256 MB of free RAM, 100 MB available"]


def test_models_that_fit_alone_but_not_together(tmp_path: Path) -> None:
    models = {"a": torch_model({"min_free_ram_mb": 60}), "b": torch_model({"min_free_ram_mb": 60})}
    problems = check_requirements(load_config(config(tmp_path, models)), ram_mb=100)
    assert problems == ["models a, b: together require 120 MB of free RAM, 100 MB available"]


def test_unmet_disk_is_named_with_the_place(tmp_path: Path) -> None:
    loaded = load_config(config(tmp_path, {"digits": torch_model({"min_free_disk_mb": 10**12})}))
    (problem,) = check_requirements(loaded)
    assert problem.startswith(f"model digits: requires {10**12} MB of free disk at {ASSETS}")


def test_cgroup_limit_tightens_free_ram(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 16000000 kB\nMemAvailable: 8000000 kB\n")
    cgroup = tmp_path / "cg"
    cgroup.mkdir()
    (cgroup / "memory.max").write_text(str(512 * 2**20))
    (cgroup / "memory.current").write_text(str(112 * 2**20))
    assert free_ram_mb(meminfo, cgroup) == 400
    (cgroup / "memory.max").write_text("max\n")
    assert free_ram_mb(meminfo, cgroup) == 8000000 // 1024

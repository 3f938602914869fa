"""Code plug-ins come from the command line or an explicit opt-in, never from a shared file alone: a battery
or RL config that names `file.py:factory` is refused (before anything loads or is imported) unless the
user passes --allow-plugins or sets EVALSUITE_ALLOW_PLUGINS=1, and `evalsuite validate` names it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import evalsuite.models
import rl.config_checks
from evalsuite.cli import main
from evalsuite.errors import ConfigError
from evalsuite.miniature import ASSETS
from rl.config import load_config

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not (ASSETS / "pipeline").is_dir(), reason="the shipped miniature world is missing")

# importing this file would leave a trace: the tests check that nothing imported it
PLUGIN = '''
from pathlib import Path
Path(__file__).with_name("IMPORTED").write_text("the plug-in ran")
from evalsuite.classifiers.miniature import _supervised

def make(ctx):
    return _supervised(ctx, None)
'''


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("EVALSUITE_ALLOW_PLUGINS", "0")  # restored after each test, whatever the CLI sets
    path = tmp_path / "evil.py"
    path.write_text(PLUGIN)
    return path


def battery_naming(tmp_path: Path, spec: str) -> Path:
    data = yaml.safe_load((ROOT / "prompts" / "occupations.yaml").read_text())
    data.update(classifier=spec, slots={"occupation": ["doctor"]}, heldout={}, test={}, guidance_scales=[1.0],
                images_per_prompt=2, steps=2, intersections=[])
    path = tmp_path / "shared.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_a_battery_cannot_run_code_by_itself(plugin: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    battery = battery_naming(tmp_path, f"{plugin}:make")
    results = tmp_path / "results"
    assert main(["-q", "run", str(battery), "--results", str(results), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"{battery}: classifier: '{plugin}:make' is a code plug-in, which a file cannot load by itself" in err
    assert "--allow-plugins or EVALSUITE_ALLOW_PLUGINS=1" in err and "Traceback" not in err
    assert "none for miniature images" not in err  # the domain hint is for a classifier of another domain only
    assert not (tmp_path / "IMPORTED").exists() and not results.exists()
    # validate names it, and still says the battery is well formed
    assert main(["validate", str(battery)]) == 0
    out = capsys.readouterr().out
    assert f"{battery}: classifier: '{plugin}:make' is a code plug-in" in out
    assert not (tmp_path / "IMPORTED").exists()


def test_the_user_opts_in_on_the_command_line(plugin: Path, tmp_path: Path) -> None:
    battery = battery_naming(tmp_path, f"{plugin}:make")
    assert main(["-q", "run", str(battery), "--results", str(tmp_path / "r1"), "--name", "a", "--device", "cpu",
                 "--allow-plugins"]) == 0
    assert (tmp_path / "IMPORTED").exists()
    # named on the command line, a plug-in needs no flag: the user typed it
    (tmp_path / "IMPORTED").unlink()
    plain = battery_naming(tmp_path, "miniature")
    assert main(["-q", "run", str(plain), "--results", str(tmp_path / "r2"), "--name", "b", "--device", "cpu",
                 "--classifier", f"{plugin}:make"]) == 0
    info = json.loads((tmp_path / "r2" / "b" / "run.json").read_text())
    assert info["primary_classifier"] == f"{plugin}:make"


def test_an_rl_config_cannot_run_code_by_itself(plugin: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    check = evalsuite.models.check_model_source
    monkeypatch.setattr(rl.config_checks, "check_model_source",
                        lambda model: None if model == "miniature" else check(model))
    overrides = [f"reward_classifier={plugin}:make", f"evaluation.classifier={plugin}:make",
                 "evaluation.allow_same_classifier=true"]
    with pytest.raises(ConfigError) as excinfo:
        load_config(ROOT / "rl" / "configs" / "miniature.yaml", overrides)
    found = [p for p in excinfo.value.problems if "is a code plug-in" in p]
    assert [p.split(":")[0] for p in found] == ["reward_classifier", "evaluation.classifier"]
    monkeypatch.setenv("EVALSUITE_ALLOW_PLUGINS", "1")
    assert load_config(ROOT / "rl" / "configs" / "miniature.yaml", overrides).reward_classifier == f"{plugin}:make"
    assert not (tmp_path / "IMPORTED").exists()  # checking a config imports nothing

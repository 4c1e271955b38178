"""Run config validation: every violated rule is reported with its field."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from psyche.cli import app
from psyche.config import ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "config").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    cfg = load_config(path)
    assert cfg.run_id == cfg.name


def test_cross_field_rules_all_reported():
    with pytest.raises(ConfigError) as info:
        parse_config({
            "name": "bad",
            "coordinator": {"warmup_time": 100, "epoch_time": 50, "min_clients": 2,
                            "init_min_clients": 2, "witness_nodes": 3,
                            "global_batch_size_start": 4},
        })
    text = str(info.value)
    assert "warmup_time must be < epoch_time" in text
    assert "witness_nodes must be <= min_clients" in text
    assert {p.field for p in info.value.problems} >= {"coordinator.warmup_time", "coordinator.witness_nodes"}


def test_field_errors_name_the_field():
    with pytest.raises(ConfigError) as info:
        parse_config({"name": "x", "coordinator": {"total_steps": 0}, "model": {"hidden_sizee": 3}})
    fields = {p.field for p in info.value.problems}
    assert "coordinator.total_steps" in fields
    assert "model.hidden_sizee" in fields


def test_digest_is_stable_and_sensitive():
    a = parse_config({"name": "x"})
    b = parse_config({"name": "x"})
    c = parse_config({"name": "x", "lr": {"peak_lr": 0.002}})
    assert a.digest() == b.digest() != c.digest()


def test_cli_validate_config(tmp_path):
    runner = CliRunner()
    ok = runner.invoke(app, ["validate-config", str(ROOT / "config" / "tiny-fortunes.toml")])
    assert ok.exit_code == 0 and "OK" in ok.output
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "b"\n[coordinator]\nwarmup_time = 900\nepoch_time = 600\n')
    res = runner.invoke(app, ["validate-config", str(bad)])
    assert res.exit_code == 1
    assert "warmup_time must be < epoch_time" in res.output
    missing = runner.invoke(app, ["validate-config", str(tmp_path / "nope.toml")])
    assert missing.exit_code == 1 and "cannot read" in missing.output



def test_cli_validate_config_says_the_default_data_is_built_on_first_use(tmp_path, monkeypatch):
    from psyche.data.tokenize import DEFAULT_CORPUS_DIR

    if not DEFAULT_CORPUS_DIR.is_dir():
        pytest.skip("Debian package fortunes is not installed")
    monkeypatch.chdir(tmp_path)  # no data/fortunes here yet
    (tmp_path / "run.toml").write_text('name = "x"\n')
    res = CliRunner().invoke(app, ["validate-config", "run.toml"])
    assert res.exit_code == 0, res.output
    assert "data data/fortunes: not built yet: psyche train, client and demo build it" in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.toml"], "validate-config builds nothing"

"""vallex.cli: the entry points' shared --config/override parsing, and its --help listing of the keys."""

from __future__ import annotations

import pytest

from vallex import cli


def test_config_keys_are_listed_only_when_help_is_asked(monkeypatch, capsys):
    """Reading every field's docstring from the source took 2-3 s of each entry point's start on a busy
    machine: parse_config builds that listing for --help only."""
    calls = []
    real = cli.config_help
    monkeypatch.setattr(cli, "config_help", lambda **kw: calls.append(kw) or real(**kw))
    cfg, _ = cli.parse_config("what it does", sections=("run", "train"), argv=["train.max_steps=7"])
    assert cfg.train.max_steps == 7 and calls == []
    with pytest.raises(SystemExit) as e:
        cli.parse_config("what it does", sections=("run", "train"), argv=["--help"])
    assert e.value.code == 0 and calls == [{"sections": ("run", "train")}]
    out = capsys.readouterr().out
    assert out.startswith("usage:") and "what it does" in out
    assert "config keys (set in the YAML file or override as key.sub=value):" in out
    assert "train.max_steps=" in out and "run.output_dir=" in out and "data.weights" not in out

"""The config schema: YAML + dotted overrides, and the errors a user sees for bad values."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vallex.config import Config, ConfigError, config_help, field_docs, load_config, save_config

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, data: dict) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_defaults_and_yaml_and_overrides(tmp_path):
    p = write(tmp_path, {"train": {"max_steps": 40, "lr": 3e-4}, "data": {"weights": "uniform"}})
    cfg = load_config(p, ["train.max_steps=20", "data.weights={en: 0.7, ar: 0.3}", "data.languages=[en, ar]"])
    assert cfg.train.max_steps == 20  # the override wins over the file
    assert cfg.train.lr == pytest.approx(3e-4)  # the file wins over the default
    assert cfg.data.weights == {"en": 0.7, "ar": 0.3}
    assert cfg.data.languages == ["en", "ar"]
    assert cfg.train.zero_stage == Config().train.zero_stage  # untouched default
    assert isinstance(cfg.train.lr, float)


def test_int_is_accepted_where_float_is_expected(tmp_path):
    cfg = load_config(None, ["train.lr=1"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)


@pytest.mark.parametrize(
    "override, key, fragment",
    [
        ("train.max_step=3", "train.max_step", "Did you mean 'train.max_steps'"),
        ("trian.max_steps=3", "trian", "Did you mean 'train'"),
        ("train.max_steps=abc", "train.max_steps", "must be an integer"),
        ("train.max_steps=0", "train.max_steps", "must be >= 1"),
        ("train.zero_stage=4", "train.zero_stage", "must be 0, 1, 2 or 3"),
        ("train.precision=fp16", "train.precision", "must be one of fp32, bf16"),
        ("train.use_gpu=yes please", "train.use_gpu", "must be true or false"),
        ("data.weights={en: -1}", "data.weights.en", "finite weight >= 0"),
        ("data.weights={en: 0, ar: 0}", "data.weights", "at least one weight must be > 0"),
        ("data.weights={en: .nan}", "data.weights.en", "must be a finite number"),
        # non-finite numbers, wherever a float is expected
        ("train.lr=.inf", "train.lr", "must be a finite number, got inf"),
        ("prepare.max_duration=.inf", "prepare.max_duration", "must be a finite number"),
        ("train.guard.max_rise=.nan", "train.guard.max_rise", "must be a finite number"),
        ("train.guard.per_language={ar: -.inf}", "train.guard.per_language.ar", "must be a finite number"),
        ("tune.reference={en: .inf}", "tune.reference.en", "must be a finite number"),
        # caught before Ray starts, not after
        ("data.weights=temprature", "data.weights", "Did you mean 'temperature'?"),
        ("run.name=..", "run.name", "must be a folder name"),
        ("run.name=a\\b", "run.name", "must be a folder name"),
        ("run.name=a/b", "run.name", "must be a folder name"),
        ("train.keep_best_by=los/en", "train.keep_best_by", "not a metric this run reports"),
        ("data.alpha=2", "data.alpha", "must be in [0, 1]"),
        ("data.languages=en", "data.languages", "must be a list of str"),
        ("model.d_model=100", None, None),  # valid alone
        ("prepare.codec.bandwidth=7", "prepare.codec.bandwidth", "must be one of 1.5, 3, 6, 12, 24"),
        ("prepare.max_duration=0.1", "prepare.max_duration", "greater than min_duration"),
        ("train", "train", "key.sub=value"),
    ],
)
def test_bad_values_name_the_key(override, key, fragment):
    if key is None:
        load_config(None, [override])
        return
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert err.value.key == key
    assert fragment in str(err.value)


def test_weights_and_keep_best_by_are_checked_against_other_sections_before_ray():
    with pytest.raises(ConfigError, match=r"weights for \['fr'\], which data.languages"):
        load_config(None, ["data.languages=[en, ar]", "data.weights={en: 1, fr: 1}"])
    with pytest.raises(ConfigError, match="keep_best_by: 'nar_loss/en' is not a metric"):
        load_config(None, ["train.train_stage=ar", "train.keep_best_by=nar_loss/en"])
    load_config(None, ["data.weights=runs/tune/best_weights.json", "train.keep_best_by=ar_loss/en"])


def test_entry_points_check_the_files_a_run_reads_before_ray(tmp_path):
    from vallex.config import check_local_paths

    for override in (
        f"data.weights={tmp_path}/best_weights.json",
        f"train.guard.baseline={tmp_path}/report.json",
        f"train.init_from={tmp_path}/model.pt",
    ):
        key = override.split("=")[0]
        with pytest.raises(ConfigError, match=f"{key}: no such file"):
            check_local_paths(load_config(None, [override]))
    (tmp_path / "report.json").write_text("{}")
    check_local_paths(load_config(None, [f"train.guard.baseline={tmp_path}/report.json"]))
    # the real entry point exits with the message, before any Ray work
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "ray_jobs/train.py"),
            "--config",
            str(ROOT / "job.yaml"),
            "data.weights=temprature",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "Did you mean 'temperature'?" in out.stderr, out.stderr[-2000:]
    assert "ray" not in out.stderr.lower().replace("ray_jobs", "")


def test_cross_field_check_names_both():
    with pytest.raises(ConfigError, match="divisible by nhead"):
        load_config(None, ["model.d_model=100", "model.nhead=3"])


def test_errors_name_the_file(tmp_path):
    p = write(tmp_path, {"train": {"batch_size": -2}})
    with pytest.raises(ConfigError, match=r"train.batch_size: must be >= 1 \(in .*cfg.yaml\)"):
        load_config(p)
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_save_load_round_trip(tmp_path):
    cfg = load_config(None, ["train.max_steps=7", "data.weights={en: 1.0}"])
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg


def test_every_field_is_documented():
    import dataclasses

    def walk(cls):
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            value = getattr(cls(), f.name)
            if dataclasses.is_dataclass(value):
                walk(type(value))
            else:
                assert docs.get(f.name), f"{cls.__name__}.{f.name} has no docstring"

    walk(Config)
    text = config_help()
    assert "train.max_steps=300" in text and "Optimizer steps in the run." in text


def test_job_yaml_is_a_valid_config():
    cfg = load_config(ROOT / "job.yaml")
    assert cfg.job.entrypoint.startswith("python ray_jobs/")
    assert cfg.corpus.source == "demo"
    assert cfg.train.num_workers == 2 and cfg.train.zero_stage == 2


def test_entry_point_rejects_bad_config_before_ray_starts():
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "ray_jobs/train.py"),
            "--config",
            str(ROOT / "job.yaml"),
            "train.max_step=3",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Did you mean 'train.max_steps'" in proc.stderr
    assert "Ray" not in proc.stderr.split("config error")[0]  # nothing started before the check

"""What vallex promises about secrets and what it listens on (docs/SECURITY.md).

- secrets: the values of ``job.runtime_env.env_vars`` and the credentials of a URL never reach a file
  vallex writes, a copy of the config handed to workers or Tune, or a log line (the real writers here;
  tests/tune/test_search.py's end-to-end search greps every file of a real Tune run for them);
- cluster configs: the dashboard / job API is never opened to the network without Ray's token
  authentication, the Ray Client port is not exposed, GCP nodes get narrow OAuth scopes, the Docker
  build context leaves runs, .git and .venv out;
- a real ``ray start --head`` with ``RAY_AUTH_MODE=token`` refuses a job submitted without its token and
  runs one that ``ray_jobs/submit.py`` submits with it.
"""

from __future__ import annotations

import pickle
import time
from pathlib import Path

import pytest
import yaml

from vallex.config import REDACTED, load_config, mask_url, redact, save_config

ROOT = Path(__file__).resolve().parents[1]
SECRET = "s3cr3t-VALUE-4f1c"  # an env var's value
PASSWORD = "pw-9ZQ-hunter2"  # inside a tracking URI


def _secret_overrides(tmp_path: Path) -> list[str]:
    return [
        f"run.output_dir={tmp_path}",
        f"job.runtime_env.env_vars.WANDB_API_KEY={SECRET}",
        f"train.tracking_uri=https://vallex:{PASSWORD}@mlflow.example:5000/?token={PASSWORD}",
        "train.tracking=[mlflow]",
    ]


# ---------------------------------------------------------------------------------------------------
# Secrets


@pytest.mark.parametrize(
    "text, expected",
    [
        ("http://alice:pw@mlflow:5000/api", "http://alice:***@mlflow:5000/api"),
        ("https://ghp_abc123@github.com/o/r.git", "https://***@github.com/o/r.git"),
        ("https://h/x?run=3&access_token=abc&sig=9", "https://h/x?run=3&access_token=***&sig=***"),
        (
            "s3://b/k?X-Amz-Credential=AKIA/x&X-Amz-Signature=ff",
            "s3://b/k?X-Amz-Credential=***&X-Amz-Signature=***",
        ),
        ("sqlite:////runs/demo/mlflow.db", "sqlite:////runs/demo/mlflow.db"),
        ("databricks", "databricks"),
        ("not a url: a?token=1", "not a url: a?token=1"),
    ],
)
def test_mask_url(text, expected):
    assert mask_url(text) == expected


def test_config_copies_and_written_config_hold_no_secrets(tmp_path):
    """The one redaction path, through the real writers: config.yaml, the dict workers and Tune trials
    get, the tracker params, and the Tune callback pickled with the experiment's state."""
    from vallex.data.synthetic import write_synthetic_corpus
    from vallex.train.tracking import tracking_settings
    from vallex.tune.search import Progress, make_setup, trial_config

    cfg = load_config(ROOT / "job.yaml", _secret_overrides(tmp_path))
    assert cfg.job.runtime_env["env_vars"]["WANDB_API_KEY"] == SECRET  # what submit.py sends: intact

    save_config(cfg, tmp_path / "config.yaml")
    written = (tmp_path / "config.yaml").read_text()
    assert SECRET not in written and PASSWORD not in written
    saved = yaml.safe_load(written)
    assert saved["job"]["runtime_env"]["env_vars"] == {
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": REDACTED,  # names kept, values gone
        "WANDB_API_KEY": REDACTED,
    }
    assert saved["train"]["tracking_uri"] == "https://vallex:***@mlflow.example:5000/?token=***"

    # Workers get to_dict(): no env values, but the real tracking URI (rank 0 must reach the server).
    data = cfg.to_dict()
    assert SECRET not in repr(data) and data["train"]["tracking_uri"] == cfg.train.tracking_uri
    settings = tracking_settings(cfg)
    assert settings["mlflow_uri"] == cfg.train.tracking_uri
    assert PASSWORD not in repr(settings["config"]) and SECRET not in repr(settings["config"])  # params

    # Tune: every trial's config is built from setup["base"]; the Progress callback is pickled into the
    # experiment's state on disk.
    write_synthetic_corpus(tmp_path / "prepare", {"en": 20, "fr": 10})
    setup = make_setup(cfg)
    trial = trial_config(setup, {"en": 0.5, "fr": 0.5}, "t0")
    assert SECRET not in repr(setup) and SECRET not in repr(trial.to_dict())
    assert trial.train.tracking_uri == cfg.train.tracking_uri  # a trial still logs to the server
    state = pickle.dumps(Progress("search", 1, setup))
    assert SECRET.encode() not in state and PASSWORD.encode() not in state


def test_redact_keeps_names_and_leaves_the_input_alone():
    data = {"job": {"runtime_env": {"env_vars": {"A": "1", "B": "two"}, "pip": ["x"]}}, "train": {"lr": 1.0}}
    out = redact(data)
    assert out["job"]["runtime_env"]["env_vars"] == {"A": REDACTED, "B": REDACTED}
    assert out["job"]["runtime_env"]["pip"] == ["x"] and out["train"] == {"lr": 1.0}
    assert data["job"]["runtime_env"]["env_vars"] == {"A": "1", "B": "two"}


def test_config_yaml_cannot_build_python_objects(tmp_path):
    from vallex.config import ConfigError

    marker = tmp_path / "ran"
    evil = tmp_path / "evil.yaml"
    evil.write_text(f"run: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(evil)
    with pytest.raises(ConfigError):
        load_config(None, [f"run.name=!!python/object/apply:os.system ['touch {marker}']"])
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------
# DeepSpeed's CPU communication op: the cache check that decides whether a run announces a build


def test_comm_op_cache_check_reads_torchs_build_folder(tmp_path, monkeypatch):
    """is_cached() must agree with what torch's JIT loader will do: a library built from this
    environment's DeepSpeed sources is cached; one recorded from another path (a symlinked .venv) or
    missing is not, and then the run says what it is about to do before the (minutes-long) build."""
    import importlib.util
    import logging

    from vallex.train import comm_op

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    folder = comm_op.build_dir()
    assert folder == tmp_path / comm_op.OP_NAME  # torch's own rule for the build folder
    package = Path(importlib.util.find_spec("deepspeed").origin).parent
    sources = [package / "ops/csrc/cpu/comm/shm_interface.cpp", package / "ops/csrc/cpu/comm/shm.cpp"]
    assert all(p.is_file() for p in sources)  # the paths the check looks for are DeepSpeed's real sources
    assert not comm_op.is_cached()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "build.ninja").write_text("".join(f"build x.o: compile {p}\n" for p in sources))
    assert not comm_op.is_cached()  # no library yet
    (folder / f"{comm_op.OP_NAME}.so").write_bytes(b"\x7fELF")
    assert comm_op.is_cached()
    (folder / "build.ninja").write_text(
        "".join(f"build x.o: compile /elsewhere/.venv/deepspeed/{p.name}\n" for p in sources)
    )
    assert not comm_op.is_cached()  # ninja would rebuild: another path to the sources

    # Not cached: the announcement comes before the build starts (the build itself is DeepSpeed's).
    order = []
    monkeypatch.setattr(comm_op, "op_needed", lambda: True)
    monkeypatch.setattr(comm_op, "build", lambda: order.append("build") or 1.0)

    class Record(logging.Handler):
        def emit(self, record):
            order.append(record.getMessage())

    logger = logging.getLogger("vallex.train")
    handler, level = Record(logging.INFO), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        comm_op.ensure_built()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert order[0].startswith(
        "building DeepSpeed's CPU communication op (deepspeed_shm_comm) with gcc, once"
    )
    assert order[1] == "build" and "ready" in order[2]
    # A lock left by a killed build makes torch wait forever: the run says so before it waits.
    (folder / "lock").touch()
    order.clear()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        comm_op.ensure_built()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert order[1].startswith(f"another process holds torch's build lock {folder / 'lock'}"), order


# ---------------------------------------------------------------------------------------------------
# Cluster configs (static): no open job API without token auth, no Ray Client port, narrow scopes


def _cluster_docs() -> dict[str, list[dict]]:
    return {
        str(p.relative_to(ROOT)): [d for d in yaml.safe_load_all(p.read_text()) if d]
        for p in sorted((ROOT / "cluster").rglob("*.yaml"))
        if "deepspeed" not in p.parts
    }


def test_cluster_configs_never_open_the_job_api_without_token_auth():
    docs = _cluster_docs()
    assert {
        "cluster/launcher/aws.yaml",
        "cluster/launcher/gcp.yaml",
        "cluster/kuberay/raycluster.yaml",
    } <= set(docs)
    for path, items in docs.items():
        assert "cloud-platform" not in yaml.safe_dump(items), f"{path}: a node gets the cloud-platform scope"
        for doc in items:
            if doc.get("kind") == "RayCluster":
                spec = doc["spec"]
            elif doc.get("kind") == "RayJob":
                spec = doc["spec"]["rayClusterSpec"]
            elif "available_node_types" in doc:  # a Ray cluster launcher config
                run_options = " ".join(doc.get("docker", {}).get("run_options", []))
                assert "RAY_AUTH_MODE=token" in run_options, f"{path}: Ray runs without token auth"
                mounts = doc.get("file_mounts", {})
                assert any(t.endswith("/.ray/auth_token") for t in mounts), f"{path}: no token on the nodes"
                commands = " ".join(doc["head_start_ray_commands"] + doc["worker_start_ray_commands"])
                assert "ray-client-server-port" not in commands
                continue
            else:
                continue
            assert spec.get("authOptions", {}).get("mode") == "token", (
                f"{path}: {doc['kind']} without authOptions"
            )
            ports = [
                p["containerPort"]
                for group in [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
                for c in group["template"]["spec"]["containers"]
                for p in c.get("ports", [])
            ]
            assert 10001 not in ports, f"{path}: the Ray Client port is exposed"
    gcp = docs["cluster/launcher/gcp.yaml"][0]
    for name, node in gcp["available_node_types"].items():
        scopes = {s for sa in node["node_config"]["serviceAccounts"] for s in sa["scopes"]}
        assert "https://www.googleapis.com/auth/devstorage.read_write" in scopes, name
        assert ("https://www.googleapis.com/auth/compute" in scopes) == (name == gcp["head_node_type"]), name


def test_docker_image_leaves_runs_git_and_venv_out_and_builds_the_comm_op():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".git", ".venv", "runs", ".cache", "**/__pycache__"} <= ignored
    dockerfile = (ROOT / "cluster" / "docker" / "Dockerfile").read_text()
    assert "python -m vallex.train.comm_op" in dockerfile and "ENV RAY_AUTH_MODE=token" in dockerfile
    assert "pip install --no-cache-dir --no-deps -e ." in dockerfile  # ray_jobs/ import the package


def test_scripts_import_the_installed_package_and_edit_no_sys_path():
    """vallex is installed (make's venv, the cluster image) and a Ray job's working_dir is on its
    PYTHONPATH: no entry point or bench puts a folder on sys.path."""
    scripts = [*ROOT.glob("ray_jobs/*.py"), *ROOT.glob("bench/*.py")]
    assert len(scripts) > 10
    edits = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in scripts
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if "sys.path" in line
    ]
    assert not edits, edits


# ---------------------------------------------------------------------------------------------------
# Token authentication (a token-authenticated cluster refusing jobs without the token and running the
# training job with it: tests/jobs/test_cluster.py::TestTwoNodes, whose cluster has token auth on)


def test_submit_finds_the_token_in_rays_order(tmp_path, monkeypatch):
    from vallex.submission import SubmitError, auth_token

    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    assert auth_token() == (None, "")
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert auth_token() == ("from-home", str(tmp_path / ".ray" / "auth_token"))
    (tmp_path / "tok").write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert auth_token()[0] == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert auth_token() == ("from-env", "$RAY_AUTH_TOKEN")
    (tmp_path / "explicit").write_text("from-file")
    assert auth_token(str(tmp_path / "explicit"))[0] == "from-file"
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(SubmitError, match="is empty"):
        auth_token(str(tmp_path / "empty"))


def test_driver_says_what_happens_while_the_train_workers_start(ray_cluster, tmp_path, monkeypatch):
    """The driver's poller of the real metrics sink prints a line when no evaluation came for a while
    (worker start-up, DeepSpeed set-up, the first Ray Data read), instead of staying silent."""
    import logging
    import threading

    from vallex.train import trainer
    from vallex.train.metrics import sink_on_this_node

    monkeypatch.setattr(trainer, "STARTUP_HEARTBEAT_S", 0.5)
    lines: list[str] = []

    class Record(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    logger = logging.getLogger("vallex.train")
    handler, level = Record(logging.INFO), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    stop = threading.Event()
    sink = sink_on_this_node(str(tmp_path / "metrics.jsonl"), truncate=True)
    poller = threading.Thread(target=trainer._poll, args=(sink, 10, stop), daemon=True)
    try:
        poller.start()
        deadline = time.time() + 60
        while not any("starting the Train workers" in line for line in lines) and time.time() < deadline:
            stop.wait(0.2)
    finally:
        stop.set()
        poller.join(timeout=15)
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert any(
        line.startswith("starting the Train workers (DeepSpeed set-up, first data read)") for line in lines
    ), lines


def test_tune_progress_names_the_running_trials_when_nothing_was_said_for_a_while(tmp_path, monkeypatch):
    """A trial's own lines stay in its worker; the driver's Progress callback says which trials run."""
    import logging
    from types import SimpleNamespace

    from vallex.data.synthetic import write_synthetic_corpus
    from vallex.tune import search

    write_synthetic_corpus(tmp_path / "prepare", {"en": 20, "fr": 10})
    progress = search.Progress("search", 2, make_setup_for(tmp_path))
    progress.setup()
    trial = SimpleNamespace(
        trial_id="t1", status="RUNNING", config={"stick_en": 0.5}, last_result={"step": 3}
    )
    lines: list[str] = []

    class Record(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    logger = logging.getLogger("vallex.tune")
    handler, level = Record(logging.INFO), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        progress.on_trial_start(0, [trial], trial)
        progress.on_step_begin(1, [trial])  # just said something: quiet
        progress.started["t1"] -= 45
        progress.last_line -= search.HEARTBEAT_S
        progress.on_step_begin(2, [trial])
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert len(lines) == 2 and lines[0].startswith("search t1 started"), lines
    assert lines[1] == "search trials running: t1 (45 s, step 3)"


def make_setup_for(tmp_path):
    from vallex.tune.search import make_setup

    return make_setup(load_config(None, [f"run.output_dir={tmp_path}", "train.max_steps=3"]))

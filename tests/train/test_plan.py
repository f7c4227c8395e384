"""The run plan (vallex/train/plan.py) and the library's layering: no Ray, no training, fast."""

from __future__ import annotations

import ast
import importlib.util
import pickle
import re
from pathlib import Path

import pytest

from vallex.config import load_config
from vallex.data.synthetic import write_synthetic_corpus
from vallex.train.plan import plan_run, row_budget

ROOT = Path(__file__).resolve().parents[2]

# Data flows one way: a module may import its own layer and the layers before it, never a later one.
LAYERS = [
    {"files", "storage", "locks", "logs", "runtime"},  # infrastructure: paths, URIs, locks, logging
    {"text"},
    {"config"},
    {"codec"},
    {"data"},
    {"model"},
    {"eval"},
    {"train"},
    {"tune"},
    {"cli", "submission"},  # the entry points' argument parsing; submitting a job file to a cluster
]


def _imports() -> dict[str, set[str]]:
    """Every vallex module's vallex imports, module-level and function-level alike
    (``from vallex.codec import mel_rvq`` imports the module ``vallex.codec.mel_rvq``)."""
    found: dict[str, set[str]] = {}
    for path in (ROOT / "vallex").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
        found[name] = {n for n in names if n == "vallex" or n.startswith("vallex.")}
    # keep the names that are modules; an imported function or class stands for its module
    return {
        m: {
            n if n in found else n.rsplit(".", 1)[0]
            for n in names
            if n in found or n.rsplit(".", 1)[0] in found
        }
        for m, names in found.items()
    }


def _layer(module: str) -> int:
    part = module.split(".")[1]
    return next(i for i, names in enumerate(LAYERS) if part in names)


def _against_the_flow(graph) -> list[str]:
    return sorted(
        f"{a} imports {b}" for a, bs in graph.items() if a != "vallex" for b in bs if _layer(b) > _layer(a)
    )


def _cycle(graph) -> list[str] | None:
    """One import cycle (module names, the first repeated at the end), or None."""
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if nxt == node or node.startswith(nxt + "."):  # a module's own package (its __init__ runs first)
                continue
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt, [*path, nxt])):
                return found
        state[node] = 2
        return None

    for module in sorted(graph):
        if module not in state and (found := visit(module, [module])):
            return found
    return None


def test_imports_follow_the_layers_and_form_no_cycle():
    graph = _imports()
    assert "vallex.train.plan" in graph["vallex.train.trainer"]  # the scan sees the package's imports
    assert _against_the_flow(graph) == [], "text/codec -> data -> model -> eval -> train -> tune"
    assert _cycle(graph) is None


def test_the_layering_checks_catch_what_was_there(monkeypatch):
    """What the checks above would say of the imports this issue removed (train -> tune, eval -> train,
    model/checkpoint <-> model/text_bridge), function-level ones included."""
    graph = _imports()
    graph["vallex.train.loop"].add("vallex.tune.objective")
    graph["vallex.eval.intelligibility"].add("vallex.train.loop")
    assert _against_the_flow(graph) == [
        "vallex.eval.intelligibility imports vallex.train.loop",
        "vallex.train.loop imports vallex.tune.objective",
    ]
    graph = _imports()
    graph["vallex.model.text_bridge"].add("vallex.model.checkpoint")
    assert _cycle(graph) == ["vallex.model.checkpoint", "vallex.model.text_bridge", "vallex.model.checkpoint"]


def _cfg(tmp_path, *overrides):
    return load_config(None, [f"run.output_dir={tmp_path}", "train.max_steps=5", *overrides])


def test_plan_resolves_once_and_pickles(tmp_path):
    write_synthetic_corpus(tmp_path / "prepare", {"en": 30, "zh": 10, "ar": 5})
    cfg = _cfg(tmp_path, "data.weights=proportional", "data.languages=[zh,en]", "data.valid_max_rows=3")
    plan = plan_run(cfg)
    assert plan.languages == ("en", "zh") and plan.model_languages == ("en", "zh")
    assert plan.language_ids == {"en": 0, "zh": 1}
    assert list(plan.counts) == ["zh", "en"]  # data.languages' order, as weights.json keeps it
    assert plan.weights == pytest.approx({"en": 0.75, "zh": 0.25}) and sum(plan.weights.values()) == 1.0
    assert plan.budget_rows == row_budget(cfg.train) == 5 * cfg.train.grad_accum * cfg.train.batch_size * 2
    assert row_budget(cfg.train, max_steps=100) == 100 * cfg.train.grad_accum * cfg.train.batch_size * 2
    assert plan.valid_max_rows == 3 and plan.prepared_dir == cfg.prepared_dir
    assert plan.model_config["num_languages"] == 2 and plan.model_config["num_phonemes"] == plan.num_symbols
    assert pickle.loads(pickle.dumps(plan)) == plan  # plain data: travels to Ray workers and Tune state
    with pytest.raises(AttributeError):
        plan.weights = {}  # frozen

    trial = plan.with_weights({"en": 1, "zh": 3}, storage_path="/elsewhere")
    assert trial.weights == pytest.approx({"en": 0.25, "zh": 0.75}) and trial.storage_path == "/elsewhere"
    assert (trial.languages, trial.model_config, trial.budget_rows) == (
        plan.languages,
        plan.model_config,
        plan.budget_rows,
    )
    with pytest.raises(ValueError, match=r"weight for 'fr', a language without shards here"):
        plan.with_weights({"fr": 1.0})


def test_plan_errors_name_the_key(tmp_path):
    write_synthetic_corpus(tmp_path / "prepare", {"en": 30, "zh": 10})
    with pytest.raises(
        ValueError, match=r"data.languages: \['fr'\] have no prepared shards in .*prepared: \['en', 'zh'\]"
    ):
        plan_run(_cfg(tmp_path, "data.languages=[en,fr]"))
    with pytest.raises(ValueError, match=r"data.weights: .*weight for 'ar', a language without shards here"):
        plan_run(_cfg(tmp_path, "data.weights={en: 1, ar: 1}"))


def _train_entry():
    spec = importlib.util.spec_from_file_location("train_entry", ROOT / "ray_jobs" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("override", "message"),
    [
        # a typo in the policy name: the key, a suggestion and the valid names
        (
            "data.weights=temperatur",
            r"data.weights: unknown policy 'temperatur'. Did you mean 'temperature'\? Use one of uniform, proportional, temperature, unimax",
        ),
        # a map naming a language the corpus does not hold: known only once the corpus is open
        (
            "data.weights={en: 1, ar: 1}",
            r"data.weights: .*'ar', a language without shards here; available: \['en', 'zh'\]",
        ),
    ],
)
def test_bad_weights_fail_before_ray_starts(tmp_path, monkeypatch, capsys, override, message):
    write_synthetic_corpus(tmp_path / "prepare", {"en": 30, "zh": 10})
    config = tmp_path / "job.yaml"
    config.write_text("run: {name: plan-check}\n")  # the defaults, not the repository's job.yaml
    entry = _train_entry()

    def no_ray():
        raise AssertionError("Ray was started before the run's plan was checked")

    monkeypatch.setattr(entry, "init_ray", no_ray)
    with pytest.raises((SystemExit, ValueError)) as failure:  # a config error exits as argparse does
        entry.main(["--config", str(config), f"run.output_dir={tmp_path}", "train.max_steps=5", override])
    assert re.search(message, f"{failure.value} {capsys.readouterr().err}"), failure.value


def test_derive_config_changes_dotted_keys_and_validates_again(tmp_path):
    from vallex.config import ConfigError, derive_config

    cfg = _cfg(tmp_path)
    derived = derive_config(
        cfg, {"train.guard.action": "warn", "run.name": "child", "data.weights": {"en": 1}}
    )
    assert (derived.train.guard.action, derived.run.name, derived.data.weights) == (
        "warn",
        "child",
        {"en": 1},
    )
    assert (cfg.train.guard.action, cfg.run.name) != ("warn", "child")  # the original is untouched
    assert derived.train.max_steps == cfg.train.max_steps
    with pytest.raises(ConfigError, match=r"train.max_steps"):
        derive_config(cfg, {"train.max_steps": 0})
    with pytest.raises(ConfigError, match=r"'name' is not a section"):
        derive_config(cfg, {"run.name.x": 1})

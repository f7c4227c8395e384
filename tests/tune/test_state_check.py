"""The check of Ray Tune's saved state before a resume unpickles it (vallex.tune.state_check).

Crafted pickles, read without being loaded: what Tune saves for a vallex search passes; code reached
through a global, a call, a function pickled by value, or state set on what the pickle did not build is
refused, naming the file, the trial and the global. In-process, no Ray started. The real state of a
real search is checked in tests/tune/test_search.py::test_end_to_end_search_records_a_failed_trial_and_resumes.
"""

from __future__ import annotations

import argparse
import builtins
import functools
import json
import os
import pickle
import sys

import pytest
from ray import cloudpickle

from vallex.tune.state_check import (
    PickleRefused,
    UnsafeTuneStateError,
    check_experiment_state,
    json_pickles,
    refusals,
    scan_pickle,
)


class RunsCommand:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_a_reduce_to_os_system_is_named_at_every_protocol_and_never_run(tmp_path, protocol):
    marker = tmp_path / "ran"
    data = pickle.dumps({"a": [1, RunsCommand(f"touch {marker}")]}, protocol=protocol)
    scan = scan_pickle(data)
    assert ("posix", "system") in scan.globals and ("posix", "system") in scan.called
    assert refusals(data)[0] == "posix.system"
    # the same names through the memo: STACK_GLOBAL reads its strings back from it
    twice = pickle.dumps([RunsCommand("true"), RunsCommand("false")], protocol=protocol)
    assert scan_pickle(twice).globals.count(("posix", "system")) >= 1
    assert not marker.exists()


@pytest.mark.parametrize(
    "obj, named",
    [
        (eval, "builtins.eval"),
        (getattr, "builtins.getattr"),
        (functools.partial(len, "x"), "functools.partial"),  # not print: a test may replace it
        (json.JSONDecoder, "json.decoder.JSONDecoder"),
    ],
)
def test_globals_outside_the_list_are_refused_by_name(obj, named):
    assert named in refusals(pickle.dumps(obj, protocol=4))


def test_functions_pickled_by_value_are_refused_unless_their_code_is_argparses_identity():
    marker = "/nonexistent/ran"
    by_value = cloudpickle.dumps(lambda: os.system(f"touch {marker}"))
    bad = refusals(by_value)
    assert any("pickled by value" in b and "<lambda>" in b for b in bad), bad
    assert "ray.cloudpickle.cloudpickle.subimport" in bad  # how it reaches the os module

    # What Tune's BasicVariantGenerator saves holds an argparse parser, whose "identity" type function is
    # local to ArgumentParser.__init__ and so pickled by value. It passes...
    parser = argparse.ArgumentParser(prog="tune.py")
    parser.add_argument("--stop", default="{}", type=json.loads)
    assert refusals(cloudpickle.dumps(parser)) == []

    # ... but not a function with the same name and other code.
    def identity(string):
        return os.system(string)

    identity.__code__ = identity.__code__.replace(co_qualname="ArgumentParser.__init__.<locals>.identity")
    parser.register("type", None, identity)
    bad = refusals(cloudpickle.dumps(parser))
    assert any("pickled by value ('ArgumentParser.__init__.<locals>.identity')" in b for b in bad), bad


def test_what_no_allow_list_can_make_safe_is_refused():
    # A listed global *called* where a saved state only refers to it (a function that uploads files).
    upload = (
        b"\x80\x04cray.train._internal.storage\n_upload_to_fs_path\n(X\x01\x00\x00\x00aX\x01\x00\x00\x00bNtR."
    )
    assert any("a call of ray.train._internal.storage._upload_to_fs_path" in b for b in refusals(upload))
    # BUILD on a module-level class: would set attributes on the real class (monkeypatching vallex).
    patch = (
        b"\x80\x04cvallex.tune.search\nProgress\nN}X\x05\x00\x00\x00setup\x8c\x04json\x8c\x05loads\x93s\x86b."
    )
    with pytest.raises(PickleRefused, match="BUILD at byte .* on vallex.tune.search.Progress"):
        scan_pickle(patch)
    # cloudpickle's _function_setstate on a real module function: would rewrite that module's globals.
    setstate = (
        b"\x80\x04\x8c\x1bray.cloudpickle.cloudpickle\x94\x8c\x12_function_setstate\x94\x93"
        b"\x8c\x04json\x8c\x05loads\x93}\x94\x86R."
    )
    assert any("_function_setstate on json.loads" in b for b in refusals(setstate))
    # numpy's RandomState constructor calls its second argument: only with numpy's own constructor.
    gadget = (
        b"\x80\x04\x8c\x14numpy.random._pickle\x8c\x12__randomstate_ctor\x93"
        b"\x8c\x02/x\x8c\x0bpyarrow._fs\x8c\x14FileSystem._from_uri\x93\x86R."
    )
    assert any("__randomstate_ctor" in b for b in refusals(gadget))
    # a STACK_GLOBAL whose names are not literal strings; a copyreg extension code
    with pytest.raises(PickleRefused, match="not a string"):
        scan_pickle(b"\x80\x04K\x01K\x02\x93.")
    with pytest.raises(PickleRefused, match="EXT1"):
        scan_pickle(b"\x80\x02\x82\x01.")
    # not a pickle at all
    assert "not a pickle" in refusals(b"\x80\x04\xff\xff")[0]


def test_pickles_nested_in_tunes_json_are_all_found_with_their_trial(tmp_path):
    marker = tmp_path / "ran"
    evil = pickle.dumps(RunsCommand(f"touch {marker}")).hex()
    fine = pickle.dumps({"CPU": 1.0}).hex()
    trial = {
        "trial_id": "abc_00001",
        "trainable_name": "train_trial",
        "placement_group_factory": fine,
        "results": fine,
        "config": {"deep": [{"x": {"_type": "CLOUDPICKLE_FALLBACK", "value": evil}}]},
    }
    metadata = {"checkpoint_manager": {"_type": "CLOUDPICKLE_FALLBACK", "value": fine}}
    document = {
        "trial_data": [[json.dumps(trial), json.dumps(metadata)]],
        "runner_data": {"_search_alg": {"_type": "CLOUDPICKLE_FALLBACK", "value": fine}},
    }
    found = json_pickles(json.dumps(document), "experiment_state-x.json")
    assert [w for w, _ in found].count("experiment_state-x.json (trial abc_00001)") == 2  # fallback, metadata
    assert len(found) == 5  # two trial fields, two fallbacks in the trial, one in the runner

    experiment = tmp_path / "exp"
    (experiment / "train_trial_abc").mkdir(parents=True)
    (experiment / "experiment_state-2026-01-01_00-00-00.json").write_text(json.dumps(document))
    (experiment / "tuner.pkl").write_bytes(pickle.dumps({"fine": [1, 2]}))
    (experiment / "searcher-state-2026-01-01_00-00-00.pkl").write_bytes(pickle.dumps(RunsCommand("true")))
    (experiment / "train_trial_abc" / "error.pkl").write_bytes(pickle.dumps(ValueError("boom")))
    with pytest.raises(UnsafeTuneStateError) as refused:
        check_experiment_state(str(experiment))
    message = str(refused.value)
    assert "experiment_state-2026-01-01_00-00-00.json (trial abc_00001): posix.system" in message
    assert "searcher-state-2026-01-01_00-00-00.pkl: posix.system" in message
    assert "tuner.pkl" not in message and "error.pkl" not in message  # plain data, a builtin exception
    assert "another run.name" in message and "delete that experiment folder" in message
    assert not marker.exists()

    # a trial's pickled field that is not even hex, and a planted error.pkl
    trial["results"] = "zz"
    document["trial_data"] = [[json.dumps(trial), "{}"]]
    (experiment / "experiment_state-2026-01-01_00-00-00.json").write_text(json.dumps(document))
    (experiment / "searcher-state-2026-01-01_00-00-00.pkl").unlink()
    (experiment / "train_trial_abc" / "error.pkl").write_bytes(pickle.dumps(RunsCommand("true")))
    with pytest.raises(
        UnsafeTuneStateError, match=r"(?s)field 'results' is not hex.*error.pkl: posix.system"
    ):
        check_experiment_state(str(experiment))


def test_an_experiment_of_plain_data_passes(tmp_path):
    parser = argparse.ArgumentParser()
    (tmp_path / "tuner.pkl").write_bytes(cloudpickle.dumps({"parser": parser, "errors": [KeyError("k")]}))
    (tmp_path / "experiment_state-2026-01-01_00-00-00.json").write_text(json.dumps({"trial_data": []}))
    assert check_experiment_state(str(tmp_path)) == 1


def test_a_failed_trials_exception_passes_only_as_ray_makes_it():
    from ray.exceptions import ActorDiedError, RayTaskError
    from ray.train.v2.api.exceptions import WorkerGroupError

    # What Tune writes to error.pkl when a trial's Ray Train run fails: Ray's RayTaskError(<cause>) class,
    # made at run time and so pickled by value with its methods' code.
    cause = WorkerGroupError("Training failed due to worker errors", {1: ActorDiedError()})
    assert refusals(cloudpickle.dumps(RayTaskError("train_trial", "tb", cause).as_instanceof_cause())) == []
    if sys.version_info >= (3, 11):
        grouped = builtins.ExceptionGroup("two", [ValueError("a"), KeyError("b")])
        assert (
            refusals(cloudpickle.dumps(RayTaskError("train_trial", "tb", grouped).as_instanceof_cause()))
            == []
        )

    # An exception class of the trial's own, pickled by value: refused (its code could be anything).
    class TrialsOwnError(Exception):
        pass

    bad = refusals(cloudpickle.dumps(RayTaskError("t", "tb", TrialsOwnError()).as_instanceof_cause()))
    assert any("a class pickled by value ('TrialsOwnError'" in b for b in bad), bad

    # Ray's class with one method's code changed: refused.
    dual = RayTaskError("t", "tb", ValueError("v")).as_instanceof_cause()

    def __str__(self):
        return os.system("true")

    __str__.__code__ = __str__.__code__.replace(co_qualname=type(dual).__str__.__qualname__)
    type(dual).__str__ = __str__
    bad = refusals(cloudpickle.dumps(dual))
    assert any("pickled by value" in b and "cls.__str__" in b for b in bad), bad


def test_names_that_lead_tune_out_of_the_experiment_folder_are_refused(tmp_path):
    # Ray's JSON decoder also expands a fallback blob hidden beside another one's value.
    hidden = {"_type": "CLOUDPICKLE_FALLBACK", "value": pickle.dumps(1).hex()}
    hidden["x"] = {"_type": "CLOUDPICKLE_FALLBACK", "value": pickle.dumps(RunsCommand("true")).hex()}
    found = json_pickles(json.dumps({"runner_data": hidden}), "state.json")
    assert len(found) == 2 and refusals(found[1][1]) == ["posix.system"]

    # Tune finds error.pkl at <experiment>/<trial dir>/<pickled_error_filename>: a name that leaves the
    # folder would make it unpickle a file this check never read.
    metadata = {"pickled_error_filename": "../../elsewhere/error.pkl"}
    with pytest.raises(PickleRefused, match="pickled_error_filename '../../elsewhere/error.pkl'"):
        json_pickles(
            json.dumps({"trial_data": [[json.dumps({"trial_id": "t1"}), json.dumps(metadata)]]}), "s"
        )
    with pytest.raises(PickleRefused, match="relative_logdir '/tmp/x'"):
        json_pickles(json.dumps({"trial_data": [[json.dumps({"relative_logdir": "/tmp/x"}), "{}"]]}), "s")

    storage = argparse.Namespace(trial_dir_name="/home/someone/planted")  # as Tune's StorageContext holds it
    data = pickle.dumps(storage)
    assert "trial_dir_name '/home/someone/planted' (not a plain file or folder name)" in refusals(data)

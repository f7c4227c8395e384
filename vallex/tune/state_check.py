"""Check Ray Tune's saved experiment state before ``Tuner.restore`` unpickles it.

Resuming a search (:func:`vallex.tune.search._run_experiment`) hands ``<train.storage_path>/<name>`` to
``tune.Tuner.restore``, and Ray Tune 2.58 unpickles (cloudpickle) these files from it, whoever wrote them:

- ``tuner.pkl``: the Tuner's settings (TuneConfig with the searcher and scheduler, RunConfig with the
  callbacks), read by ``TunerInternal._restore_from_path_or_uri``;
- ``experiment_state-<time>.json`` (the newest by name): JSON, but it holds pickles as hex strings:
  every ``{"_type": "CLOUDPICKLE_FALLBACK", "value": ...}`` (anything JSON cannot hold, at any depth),
  and inside each trial's own JSON state (a string in ``trial_data``) the fields
  ``results``, ``extra_arg``, ``placement_group_factory``, ``_resources``,
  ``_default_placement_group_factory`` (``Trial.__setstate__``); each trial's run metadata (the second
  string) may hold fallback pickles too. Read by ``TuneController.resume`` and ``ExperimentAnalysis``;
- every top-level ``*.json`` and ``*.pkl`` is copied to the driver's staging folder
  (``sync_down_experiment_state``), where the newest by name of each of these is unpickled:
  ``search_gen_state-*.json`` and ``basic-variant-state-*.json`` (pickles despite their name),
  ``searcher-state-*.pkl`` (the base searcher's own ``restore``: Optuna's study and sampler),
  ``callback-states-*.pkl``;
- ``<trial>/error.pkl``: the exception of a failed trial, unpickled when the results are gathered
  (``Trial.get_pickled_error``).

(The trials themselves are function trainables: Tune unpickles no checkpoint of theirs; their Ray Train
runs resume from DeepSpeed checkpoints that :mod:`vallex.train.engine` checks.)

:func:`check_experiment_state` reads each of those pickles *without running it* (``pickletools``
opcodes, with the pickle machine's stack and memo followed, literals kept) and refuses the resume,
naming the file (and the trial) and what is wrong, when a pickle

- imports a global -- a class or function the unpickler would import -- outside
  :data:`TUNE_STATE_GLOBALS` (an exact list of (module, name) gathered from real vallex searches:
  ``python -m vallex.tune.state_check <experiment folder>`` prints what a folder holds) and the
  exception classes of :func:`exception_globals`;
- calls (REDUCE, OBJ, INST) a listed global outside :data:`TUNE_STATE_CALLS`, or one of numpy's and
  cloudpickle's constructors with other arguments than Tune gives them (:func:`_call`);
- builds code (a function or class pickled *by value*) other than :func:`pinned_codes`;
- sets state on what it did not build (BUILD on a real class), calls what it built, names a global with
  computed strings, uses copyreg extensions or persistent ids (:func:`scan_pickle`);
- or holds a file or folder name (:data:`PATH_FIELDS`) that would lead Tune out of the experiment folder,
  to a pickle this check never read.

What this does not stop (docs/SECURITY.md): a pickle made only of what the lists allow still chooses the
*values* Tune resumes with (trial configs, statuses, the searcher's history), and listed classes are
rebuilt with state the writer picks. Nothing listed runs code, opens files or imports modules by name.
"""

from __future__ import annotations

import binascii
import builtins
import fnmatch
import functools
import io
import json
import pickletools
import posixpath
import re
import sys
import types
from dataclasses import dataclass

# Tune's own pickles of a vallex search (grid baselines with BasicVariantGenerator, search with Optuna TPE
# and ASHA, the vallex Progress callback), as (module, name): gathered with
# ``python -m vallex.tune.state_check <experiment folder>`` from the state of tests/tune/test_search.py's
# end-to-end search (Ray 2.58, Optuna 4, numpy 2), then reviewed: classes are rebuilt with
# ``cls.__new__`` and their state set (the few ``__setstate__`` among them only update ``__dict__`` and
# recreate a lock or a cache); functions only as values (never called) unless in TUNE_STATE_CALLS.
TUNE_STATE_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        # BasicVariantGenerator keeps Tune's own command-line parser (its "identity" type function is
        # pickled by value: see pinned_codes)
        ("argparse", "ArgumentParser"),
        ("argparse", "HelpFormatter"),
        ("argparse", "_AppendAction"),
        ("argparse", "_AppendConstAction"),
        ("argparse", "_ArgumentGroup"),
        ("argparse", "_CountAction"),
        ("argparse", "_ExtendAction"),
        ("argparse", "_HelpAction"),
        ("argparse", "_StoreAction"),
        ("argparse", "_StoreConstAction"),
        ("argparse", "_StoreFalseAction"),
        ("argparse", "_StoreTrueAction"),
        ("argparse", "_SubParsersAction"),
        ("argparse", "_VersionAction"),
        ("builtins", "int"),
        ("builtins", "str"),
        ("json", "loads"),
        ("re", "_compile"),
        ("ray.tune.resources", "json_to_resources"),
        ("ray.tune.search.basic_variant", "_TrialIterator"),
        ("ray.tune.search.basic_variant", "_VariantIterator"),
        ("ray.tune.search.sample", "_BackwardsCompatibleNumpyRng"),
        ("ray.tune.search.sample", "Float"),
        ("ray.tune.search.sample", "Float._Uniform"),
        ("ray.tune.experiment.experiment", "Experiment"),
        # pickled by value: only the pinned code objects (pinned_codes)
        ("ray.cloudpickle.cloudpickle", "_builtin_type"),
        ("ray.cloudpickle.cloudpickle", "_make_function"),
        ("ray.cloudpickle.cloudpickle", "_function_setstate"),
        # a failed trial's exception (error.pkl): Ray's RayTaskError(<exception>) class, by value
        ("builtins", "type"),
        ("builtins", "property"),
        ("builtins", "staticmethod"),
        ("ray.cloudpickle.cloudpickle", "_make_skeleton_class"),
        ("ray.cloudpickle.cloudpickle", "_class_setstate"),
        ("ray.cloudpickle.cloudpickle", "_make_empty_cell"),
        ("ray.cloudpickle.cloudpickle", "_make_cell"),
        # the Tuner, the trials and their storage
        ("collections", "deque"),
        ("datetime", "datetime"),
        ("pyarrow._fs", "FileSystem._from_uri"),
        ("ray.air._internal.usage", "AirEntrypoint"),
        ("ray.train", "SyncConfig"),
        ("ray.train._internal.checkpoint_manager", "_CheckpointManager"),
        ("ray.train._internal.storage", "StorageContext"),
        ("ray.train._internal.storage", "_FilesystemSyncer"),
        ("ray.train._internal.storage", "_upload_to_fs_path"),
        ("ray.tune", "CheckpointConfig"),
        ("ray.tune", "FailureConfig"),
        ("ray.tune", "RunConfig"),
        ("ray.tune.execution.placement_groups", "PlacementGroupFactory"),
        ("ray.tune.schedulers.async_hyperband", "AsyncHyperBandScheduler"),
        ("ray.tune.schedulers.async_hyperband", "_Bracket"),
        ("ray.tune.stopper.noop", "NoopStopper"),
        ("ray.tune.tune_config", "TuneConfig"),
        ("ray.tune.search.optuna.optuna_search", "OptunaSearch"),
        ("vallex.tune.search", "Progress"),
        # tune.scheduler=pbt (tests/tune/test_pbt.py's end-to-end search): the scheduler and its explore
        # step (plain data), the random population's searcher (a legacy RandomState: MT19937, below), and
        # each trial's latest checkpoint (a path, its pyarrow filesystem and a UUID; the trial function
        # reads only its .metadata.json, JSON, and DeepSpeed's weights-only files from it)
        ("vallex.tune.pbt", "SyncPBT"),
        ("vallex.tune.pbt", "Explore"),
        ("ray.tune.search.basic_variant", "BasicVariantGenerator"),
        ("ray.train._internal.session", "_TrainingResult"),
        ("ray.tune", "Checkpoint"),
        ("uuid", "UUID"),
        # ... and that RandomState's state array, as pickle protocol 5 writes an array: numpy's
        # ``frombuffer(buf, dtype).reshape(shape, order=order)`` of bytes the pickle holds
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy.core.numeric", "_frombuffer"),  # the same function, as numpy 1.x names it
        # Optuna's study and TPE sampler (searcher-state-*.pkl)
        ("numpy", "dtype"),
        ("numpy", "ndarray"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "_reconstruct"),  # the same function, as numpy 1.x names it
        ("numpy.random._mt19937", "MT19937"),
        ("numpy.random._pickle", "__bit_generator_ctor"),
        ("numpy.random._pickle", "__randomstate_ctor"),
        ("optuna.distributions", "FloatDistribution"),
        ("optuna.pruners._nop", "NopPruner"),
        ("optuna.samplers._lazy_random_state", "LazyRandomState"),
        ("optuna.samplers._random", "RandomSampler"),
        ("optuna.samplers._tpe.parzen_estimator", "_ParzenEstimator"),
        ("optuna.samplers._tpe.parzen_estimator", "_ParzenEstimatorParameters"),
        ("optuna.samplers._tpe.sampler", "TPESampler"),
        ("optuna.samplers._tpe.sampler", "default_weights"),
        ("optuna.search_space.intersection", "IntersectionSearchSpace"),
        ("optuna.storages._in_memory", "InMemoryStorage"),
        ("optuna.storages._in_memory", "_StudyInfo"),
        ("optuna.study._study_direction", "StudyDirection"),
        ("optuna.study.study", "Study"),
        ("optuna.trial._frozen", "FrozenTrial"),
        ("optuna.trial._state", "TrialState"),
        ("optuna.trial._trial", "Trial"),
    }
)

# The globals a saved state may *call* (REDUCE): the rest may only be referred to, or rebuilt with
# ``cls.__new__``. Each was read: enums and datetime/deque/dtype rebuild a value; ``re._compile``
# compiles a pattern; ``FileSystem._from_uri`` makes a pyarrow filesystem object for a URI; numpy's
# two constructors and cloudpickle's three are further held to the arguments Tune gives them
# (see :func:`_call`).
TUNE_STATE_CALLS: frozenset[tuple[str, str]] = frozenset(
    {
        ("collections", "deque"),
        ("datetime", "datetime"),
        ("re", "_compile"),
        ("pyarrow._fs", "FileSystem._from_uri"),
        ("ray.air._internal.usage", "AirEntrypoint"),
        ("numpy", "dtype"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.random._pickle", "__bit_generator_ctor"),
        ("numpy.random._pickle", "__randomstate_ctor"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy.core.numeric", "_frombuffer"),
        ("optuna.study._study_direction", "StudyDirection"),
        ("optuna.trial._state", "TrialState"),
        ("ray.cloudpickle.cloudpickle", "_builtin_type"),
        ("ray.cloudpickle.cloudpickle", "_make_function"),
        ("ray.cloudpickle.cloudpickle", "_function_setstate"),
        ("ray.cloudpickle.cloudpickle", "_make_skeleton_class"),
        ("ray.cloudpickle.cloudpickle", "_class_setstate"),
        ("ray.cloudpickle.cloudpickle", "_make_empty_cell"),
        ("ray.cloudpickle.cloudpickle", "_make_cell"),
        ("builtins", "property"),
        ("builtins", "staticmethod"),
    }
)

# Where the exception classes a failed trial may end with live (error.pkl): Python's and Ray's (Ray
# Train wraps the workers' errors), listed by exact (module, qualified name) from these modules when the
# check runs, plus vallex's own, below. Their constructors keep their arguments (Ray's format a message
# or read a death cause).
EXCEPTION_MODULES = (
    "builtins",
    "ray.exceptions",
    "ray.train",
    "ray.train.v2.api.exceptions",
    "ray.train.v2._internal.exceptions",
    "ray.tune.error",
)
VALLEX_EXCEPTIONS = frozenset(
    {
        ("vallex.codec.audio", "AudioError"),
        ("vallex.codec.audio", "AudioTooLong"),
        ("vallex.codec.encodec", "CodecError"),
        ("vallex.codec.encodec", "CodecCheckpointError"),
        ("vallex.config", "ConfigError"),
        ("vallex.data.corpus", "CorpusError"),
        ("vallex.data.prepare", "PrepareError"),
        ("vallex.data.sources", "ManifestError"),
        ("vallex.eval.recognizer", "RecognizerError"),
        ("vallex.locks", "LockError"),
        ("vallex.model.checkpoint", "CheckpointError"),
        ("vallex.model.text_bridge", "VocabError"),
        ("vallex.storage", "StorageError"),
        ("vallex.text.symbols", "SymbolTableError"),
        ("vallex.train.add_language", "AddLanguageError"),
        ("vallex.train.engine", "UnsafeCheckpointError"),
        ("vallex.train.trainer", "NonFiniteLossError"),
        ("vallex.tune.search", "SearchInterrupted"),
    }
)


@functools.cache
def exception_globals() -> frozenset[tuple[str, str]]:
    """(module, qualified name) of every exception class in :data:`EXCEPTION_MODULES`, as pickles name
    them, and :data:`VALLEX_EXCEPTIONS`."""
    import importlib

    out = set()
    for name in EXCEPTION_MODULES:
        for obj in vars(importlib.import_module(name)).values():
            if isinstance(obj, type) and issubclass(obj, BaseException):
                out.add((obj.__module__, obj.__qualname__))
    return frozenset(out) | VALLEX_EXCEPTIONS


@functools.cache
def pinned_codes() -> frozenset[tuple]:
    """The code objects a saved state may hold by value, as cloudpickle's arguments to ``CodeType``
    (the file name left out: it differs between installs). Functions local to another function, which
    cloudpickle cannot pickle by reference: argparse's ``identity`` (``return string``), in the parser
    BasicVariantGenerator saves; the methods of the class ``RayTaskError.as_instanceof_cause`` makes for
    a failed trial's exception (``__init__``, ``args``, ``__reduce__``, ``__getattr__``, ``__str__``).
    Taken from this interpreter's own argparse and Ray, so a state written by other versions is
    refused rather than trusted."""
    import argparse

    from ray.cloudpickle import cloudpickle
    from ray.exceptions import RayTaskError

    functions = [argparse.ArgumentParser()._registries["type"][None]]
    group = getattr(builtins, "ExceptionGroup", None)  # Python 3.11+
    for cause in [ValueError("x")] + ([group("x", [ValueError("x")])] if group else []):  # Ray's two classes
        for attr in vars(type(RayTaskError("f", "", cause).as_instanceof_cause())).values():
            if isinstance(attr, staticmethod):
                attr = attr.__func__
            functions += [attr.fget, attr.fset] if isinstance(attr, property) else [attr]
    return frozenset(
        _code_key(cloudpickle._code_reduce(f.__code__)[1])
        for f in functions
        if isinstance(f, types.FunctionType)
    )


def _code_key(args: tuple) -> tuple:
    """CodeType arguments without the file name (index 10 in cloudpickle's order for Python 3.11+)."""
    return tuple(a for i, a in enumerate(args) if i != 10)


# Opcodes that reach objects without naming a global: refused outright.
REFUSED_OPCODES = {"EXT1", "EXT2", "EXT4", "PERSID", "BINPERSID"}
STRING_OPCODES = {
    "SHORT_BINUNICODE",
    "BINUNICODE",
    "BINUNICODE8",
    "UNICODE",
    "STRING",
    "BINSTRING",
    "SHORT_BINSTRING",
}
TRIAL_PICKLED_FIELDS = (  # ray.tune.experiment.trial.Trial._nonjson_fields in Ray 2.58
    "results",
    "extra_arg",
    "placement_group_factory",
    "_resources",
    "_default_placement_group_factory",
)
FALLBACK_TYPE = "CLOUDPICKLE_FALLBACK"  # ray.tune.utils.serialization._CLOUDPICKLE_FALLBACK_TYPE
STATE_PICKLES = (  # top-level files Tune unpickles (see the module docstring)
    "tuner.pkl",
    "search_gen_state-*.json",
    "basic-variant-state-*.json",
    "searcher-state-*.pkl",
    "callback-states-*.pkl",
)
# Names Tune joins to the experiment folder to find a trial's files (error.pkl among them): a value that
# leaves the folder ("../x", "/abs") would make Tune unpickle a file this check never read.
PATH_FIELDS = (
    "relative_logdir",
    "pickled_error_filename",
    "error_filename",
    "trial_dir_name",
    "experiment_dir_name",
)
EXPERIMENT_STATE = "experiment_state-*.json"
ERROR_PICKLE = "error.pkl"


class UnsafeTuneStateError(RuntimeError):
    """Ray Tune's saved state holds a pickle that could run code when a resume unpickles it."""


class PickleRefused(ValueError):
    """A pickle this check cannot vouch for, without reference to any list of globals."""


@dataclass(frozen=True)
class _Global:  # what a GLOBAL / STACK_GLOBAL opcode leaves on the stack
    module: str
    name: str


@dataclass(frozen=True)
class _Code:  # types.CodeType(*args), built by the pickle
    args: tuple


class _Opaque:  # any other object the pickle builds (its value does not matter to the check)
    pass


class _Function(_Opaque):  # a function cloudpickle rebuilt by value (_make_function)
    pass


@dataclass(frozen=True, eq=False)
class _DynamicClass:  # a class cloudpickle rebuilt by value (_make_skeleton_class)
    name: str
    bases: tuple


_MARK = object()
_CODE_TYPE = object()  # types.CodeType, as cloudpickle pickles it: _builtin_type("CodeType")
_CLOUDPICKLE = "ray.cloudpickle.cloudpickle"
LITERAL_OPCODES = STRING_OPCODES | {
    "NONE",
    "NEWTRUE",
    "NEWFALSE",
    "INT",
    "BININT",
    "BININT1",
    "BININT2",
    "LONG",
    "LONG1",
    "LONG4",
    "FLOAT",
    "BINFLOAT",
    "BINBYTES",
    "SHORT_BINBYTES",
    "BINBYTES8",
}
TUPLE_OPCODES = {"EMPTY_TUPLE": 0, "TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}
FILLING_OPCODES = {"BUILD", "APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS"}
_NUMPY_PICKLE = "numpy.random._pickle"
_BIT_GENERATORS = {_Global("numpy.random._mt19937", "MT19937")}  # the one numpy's RandomState pickles


@dataclass
class PickleScan:
    """What a pickle would do when loaded, read without loading it."""

    globals: list[tuple[str, str]]  # every (module, name) it imports
    called: set[tuple[str, str]]  # those it calls (REDUCE, OBJ, INST): functions run, classes' __init__
    created: set[tuple[str, str]]  # classes it makes with cls.__new__(cls, ...) (NEWOBJ), state set after
    codes: list[tuple]  # the arguments of every code object it builds (cloudpickle, by value)
    items: list[tuple[str, object]]  # (key, value) of every str key set in a dict, values as literals
    problems: list[str]  # what no allow-list can make safe


def scan_pickle(data: bytes) -> PickleScan:
    """Read the pickle in ``data`` without unpickling it: which globals it imports and which it calls.

    Follows the pickle machine's stack and memo (``pickletools`` gives each opcode's stack effect, and
    literal strings, numbers, bytes and tuples are kept) so that a ``STACK_GLOBAL`` is known by the two
    strings it takes and every call by its callable. Raises :class:`PickleRefused` for a pickle that is
    malformed, names a global with anything but literal strings, calls an object it built itself (other
    than cloudpickle's code type), or uses copyreg extensions or persistent ids.
    """
    stack: list = []
    memo: dict = {}
    scan = PickleScan([], set(), set(), [], [], [])
    try:
        for op, arg, pos in pickletools.genops(io.BytesIO(data)):
            name = op.name
            if name in REFUSED_OPCODES:
                raise PickleRefused(f"opcode {name} at byte {pos} (reaches objects without naming them)")
            if name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
                if not stack or stack[-1] is _MARK:
                    raise PickleRefused(f"{name} at byte {pos} with nothing to store")
                memo[len(memo) if name == "MEMOIZE" else arg] = stack[-1]
                continue
            if name in ("GET", "BINGET", "LONG_BINGET"):
                if arg not in memo:
                    raise PickleRefused(f"{name} at byte {pos} of memo entry {arg} never stored")
                stack.append(memo[arg])
                continue
            # pop what the opcode takes
            before = op.stack_before
            marked: list = []
            if pickletools.markobject in before:  # everything down to the last MARK, then the rest
                while stack and stack[-1] is not _MARK:
                    marked.insert(0, stack.pop())
                if not stack:
                    raise PickleRefused(f"{name} at byte {pos} without a MARK")
                stack.pop()
                n = before.index(pickletools.markobject)
            else:
                n = len(before)
            if len(stack) < n or any(s is _MARK for s in stack[len(stack) - n :]):
                raise PickleRefused(f"{name} at byte {pos}: the stack holds too little")
            taken = stack[len(stack) - n :]
            del stack[len(stack) - n :]
            # push what it gives
            if name == "MARK":
                stack.append(_MARK)
            elif name in ("GLOBAL", "INST"):
                module, _, qualname = arg.partition(" ")
                scan.globals.append((module, qualname))
                if name == "INST":  # INST builds an instance of the class it names
                    scan.called.add((module, qualname))
                    stack.append(_Opaque())
                else:
                    stack.append(_Global(module, qualname))
            elif name == "STACK_GLOBAL":
                if not all(isinstance(s, str) for s in taken):
                    raise PickleRefused(
                        f"STACK_GLOBAL at byte {pos} with a module or name that is not a string"
                    )
                scan.globals.append((taken[0], taken[1]))
                stack.append(_Global(taken[0], taken[1]))
            elif name in LITERAL_OPCODES:
                stack.append(arg)
            elif name in TUPLE_OPCODES:
                stack.append(tuple(taken))
            elif name == "TUPLE":
                stack.append(tuple(marked))
            elif name in ("REDUCE", "NEWOBJ", "NEWOBJ_EX", "OBJ"):
                func = marked[0] if name == "OBJ" and marked else taken[0] if taken else None
                args = taken[1] if name == "REDUCE" else None
                stack.append(_call(func, args, name, pos, scan))
            elif name in FILLING_OPCODES:  # x.__setstate__(...), x.append(...), x[k] = v: x stays
                _record_items(taken[1:] if name == "SETITEM" else marked if name == "SETITEMS" else [], scan)
                if not isinstance(taken[0], _Opaque) or isinstance(taken[0], _Function):
                    raise PickleRefused(
                        f"{name} at byte {pos} on {_describe(taken[0])} (sets state on what it did not build)"
                    )
                stack.append(taken[0])
            else:
                if name == "DICT":
                    _record_items(marked, scan)
                stack.extend(_Opaque() for _ in op.stack_after)
    except ValueError as e:
        if isinstance(e, PickleRefused):
            raise
        raise PickleRefused(f"not a pickle this check can read: {e}") from None
    return scan


def _record_items(pairs: list, scan: PickleScan) -> None:
    scan.items += [(k, v) for k, v in zip(pairs[::2], pairs[1::2], strict=False) if isinstance(k, str)]


def _call(func, args, opcode: str, pos: int, scan: PickleScan):
    """What a call in the pickle gives, and what it says about the pickle."""
    if func is _CODE_TYPE and opcode == "REDUCE":
        if not isinstance(args, tuple):
            raise PickleRefused(f"a code object at byte {pos} built from values this check cannot read")
        scan.codes.append(args)
        return _Code(args)
    if isinstance(func, _DynamicClass):  # its methods are code objects checked on their own (pinned_codes)
        return _Opaque()
    if not isinstance(func, _Global):
        raise PickleRefused(f"{opcode} at byte {pos} calls an object the pickle built itself")
    if opcode in ("NEWOBJ", "NEWOBJ_EX"):
        scan.created.add((func.module, func.name))
        return _Opaque()
    scan.called.add((func.module, func.name))
    key = (func.module, func.name)
    args = args if isinstance(args, tuple) else ()
    first = args[0] if args else None
    # Listed functions that call what they are given, or change what they are given: only as Tune uses them.
    if key == (_CLOUDPICKLE, "_builtin_type"):
        if args != ("CodeType",):
            scan.problems.append(f"{_CLOUDPICKLE}._builtin_type{args!r} (only CodeType is allowed)")
        return _CODE_TYPE
    if key == (_CLOUDPICKLE, "_make_function"):
        if not isinstance(first, _Code):
            scan.problems.append(f"{_CLOUDPICKLE}._make_function of a code object this check cannot read")
        return _Function()
    if key == (_CLOUDPICKLE, "_make_skeleton_class"):
        return _dynamic_class(args, scan)
    if key == (_CLOUDPICKLE, "_class_setstate") and not isinstance(first, _DynamicClass):
        scan.problems.append(
            f"{_CLOUDPICKLE}._class_setstate on {_describe(first)} (only on a class it rebuilt)"
        )
    if key == (_CLOUDPICKLE, "_function_setstate") and not isinstance(first, _Function):
        scan.problems.append(
            f"{_CLOUDPICKLE}._function_setstate on {_describe(first)} (only on a function it rebuilt)"
        )
    if key == (_NUMPY_PICKLE, "__bit_generator_ctor") and not (
        not args or (len(args) == 1 and (isinstance(first, str) or first in _BIT_GENERATORS))
    ):
        scan.problems.append(
            f"{_NUMPY_PICKLE}.__bit_generator_ctor of {_describe(first)} (only numpy's MT19937)"
        )
    if key == (_NUMPY_PICKLE, "__randomstate_ctor") and not (
        len(args) <= 2
        and all(a == _Global(_NUMPY_PICKLE, "__bit_generator_ctor") for a in args[1:])
        and (not args or isinstance(first, str) or first in _BIT_GENERATORS or type(first) is _Opaque)
    ):
        scan.problems.append(
            f"{_NUMPY_PICKLE}.__randomstate_ctor{_describe(args)} (calls its second argument)"
        )
    return _Opaque()


def _dynamic_class(args: tuple, scan: PickleScan) -> _DynamicClass:
    """The one class by value Tune saves: the exception of a failed trial, which Ray makes inherit from
    both ``RayTaskError`` and the trial's own exception (``RayTaskError.as_instanceof_cause``)."""
    metaclass, name, bases = (tuple(args) + (None, None, None))[:3]
    if not (
        metaclass == _Global("builtins", "type")
        and isinstance(name, str)
        and name.startswith("RayTaskError(")
        and isinstance(bases, tuple)
        and len(bases) == 2
        and bases[0] == _Global("ray.exceptions", "RayTaskError")
        and isinstance(bases[1], _Global)
    ):
        scan.problems.append(
            f"a class pickled by value ({_describe(name)}, bases {_describe(bases)}): only Ray's "
            "RayTaskError(<exception>) is allowed"
        )
    return _DynamicClass(str(name), bases if isinstance(bases, tuple) else ())


def _describe(value) -> str:
    if isinstance(value, _Global):
        return f"{value.module}.{value.name}"
    if isinstance(value, tuple):
        return "(" + ", ".join(_describe(v) for v in value) + ")"
    if isinstance(value, _Opaque):
        return "an object the pickle built"
    return repr(value)[:80]


def pickle_globals(data: bytes) -> list[tuple[str, str]]:
    """Every (module, name) the pickle in ``data`` would import (see :func:`scan_pickle`)."""
    return scan_pickle(data).globals


# ---------------------------------------------------------------------------------------------------
# Where the pickles are in an experiment folder


def _hex_pickle(text) -> bytes | None:
    if not isinstance(text, str) or len(text) % 2 or not text:
        return None
    try:
        return binascii.unhexlify(text)
    except (binascii.Error, ValueError):
        return None


def _plain_name(name) -> bool:
    """A file or folder name that stays where it is joined: no separator, not ``.``/``..``."""
    return isinstance(name, str) and name not in ("", ".", "..") and not re.search(r"[/\\\x00]", name)


def json_pickles(text: str, where: str) -> list[tuple[str, bytes]]:
    """Every pickle a JSON document of Tune's holds, with where it is (``where``, then the trial id
    and key): fallback blobs at any depth, trials' pickled fields, JSON documents held as strings."""
    out: list[tuple[str, bytes]] = []

    def walk(value, at: str, trial: str | None, depth: int) -> None:
        if depth > 64:
            raise PickleRefused(f"{at}: JSON nested deeper than 64 levels")
        label = f"{at}" + (f" (trial {trial})" if trial else "")
        if isinstance(value, dict):
            trial = value.get("trial_id") if isinstance(value.get("trial_id"), str) else trial
            if value.get("_type") == FALLBACK_TYPE:
                blob = _hex_pickle(value.get("value"))
                if blob is None:
                    raise PickleRefused(f"{label}: a {FALLBACK_TYPE} value that is not hex")
                out.append((label, blob))
                value = {k: v for k, v in value.items() if k != "value"}  # Ray's decoder reads the rest too
            for key, item in value.items():
                if key in PATH_FIELDS and item is not None and not _plain_name(item):
                    raise PickleRefused(f"{label}: {key} {item!r} is not a plain file or folder name")
                if key in TRIAL_PICKLED_FIELDS and isinstance(item, str) and "trainable_name" in value:
                    blob = _hex_pickle(item)
                    if blob is None:
                        raise PickleRefused(f"{label}: trial field {key!r} is not hex")
                    out.append((f"{at} field {key}" + (f" (trial {trial})" if trial else ""), blob))
                else:
                    walk(item, at, trial, depth + 1)
        elif isinstance(value, list):
            if len(value) == 2 and all(isinstance(v, str) for v in value):  # a trial: (state, run metadata)
                try:
                    head = json.loads(value[0])
                except ValueError:
                    head = None
                if isinstance(head, dict) and isinstance(head.get("trial_id"), str):
                    trial = head["trial_id"]
            for item in value:
                walk(item, at, trial, depth + 1)
        elif isinstance(value, str):
            stripped = value.lstrip()
            if stripped[:1] in ("{", "["):  # a trial's state or run metadata: a JSON document in a string
                try:
                    inner = json.loads(value)
                except ValueError:
                    return
                walk(inner, at, trial, depth + 1)

    try:
        document = json.loads(text)
    except ValueError as e:
        raise PickleRefused(f"{where}: not JSON ({e})") from None
    walk(document, where, None, 0)
    return out


def _state_pickles(path: str):
    """(label, bytes, "pickle" | "json") of every file under ``path`` Tune may unpickle or take pickles
    from: the top-level state files, and every ``*.pkl`` at any depth (``error.pkl``, ``params.pkl``)."""
    import pyarrow.fs as pafs

    from vallex.files import filesystem

    fs, root = filesystem(path)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    for info in sorted(infos, key=lambda i: i.path):
        if info.type != pafs.FileType.File:
            continue
        rel = posixpath.relpath(info.path.replace("\\", "/"), root.replace("\\", "/"))
        base = posixpath.basename(rel)
        top = "/" not in rel
        if top and fnmatch.fnmatch(base, EXPERIMENT_STATE):
            kind = "json"
        elif (top and any(fnmatch.fnmatch(base, p) for p in STATE_PICKLES)) or base.endswith(".pkl"):
            kind = "pickle"
        else:
            continue
        with fs.open_input_stream(info.path) as f:
            yield f"{path.rstrip('/')}/{rel}", f.read(), kind


def refusals(data: bytes) -> list[str]:
    """Why the pickle ``data`` may not be loaded (empty if it may): globals outside
    :data:`TUNE_STATE_GLOBALS`, calls outside :data:`TUNE_STATE_CALLS`, by-value code that is not one of
    :func:`pinned_codes`, and what :func:`scan_pickle` refuses whatever the lists say."""
    try:
        scan = scan_pickle(data)
    except PickleRefused as e:
        return [str(e)]
    allowed = TUNE_STATE_GLOBALS | exception_globals()
    out = sorted({f"{m}.{n}" for m, n in scan.globals if (m, n) not in allowed})
    out += sorted(
        f"a call of {m}.{n} (a saved state only refers to it)"
        for m, n in scan.called
        if (m, n) in allowed and (m, n) not in TUNE_STATE_CALLS | exception_globals()
    )
    out += [
        f"{key} {value!r} (not a plain file or folder name)"
        for key, value in scan.items
        if key in PATH_FIELDS and value is not None and not _plain_name(value)
    ]
    pinned = pinned_codes()
    for args in scan.codes:
        if _code_key(args) not in pinned:
            what = args[12] if len(args) > 12 and isinstance(args[12], str) else "?"
            out.append(f"a function pickled by value ({what!r}), whose code is not one Tune saves")
    return out + scan.problems


def _check(label: str, data: bytes, problems: list[str]) -> None:
    bad = refusals(data)
    if bad:
        shown = "; ".join(bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
        problems.append(f"{label}: {shown}")


def check_experiment_state(path: str) -> int:
    """Refuse (:class:`UnsafeTuneStateError`) the resume of the Tune experiment in ``path`` (a folder
    or a ``s3://``/``gs://`` URI) if any pickle Tune would load from it could do more than rebuild
    the state a vallex search saves (see :func:`refusals`); returns how many pickles were checked."""
    problems: list[str] = []
    checked = 0
    for label, data, kind in _state_pickles(path):
        if kind == "pickle":
            checked += 1
            _check(label, data, problems)
            continue
        try:
            blobs = json_pickles(data.decode("utf-8", errors="replace"), label)
        except PickleRefused as e:
            problems.append(str(e))
            continue
        for where, blob in blobs:
            checked += 1
            _check(where, blob, problems)
    if problems:
        raise UnsafeTuneStateError(
            "refusing to resume the Tune search from "
            f"{path}: its saved state holds pickles that do what a vallex search never saves "
            "(Ray would unpickle them, which can run any code):\n  "
            + "\n  ".join(problems[:10])
            + (f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else "")
            + "\nSomeone (or another program) wrote that state. To go on, start a new search under another "
            "run.name, or, if you trust whoever can write there, delete that experiment folder (the search "
            "starts over)."
            + (
                f"\nA failed trial's {ERROR_PICKLE} holds its exception: if it is only an exception class vallex "
                f"does not list, and you trust the storage, delete that {ERROR_PICKLE} (Tune then reports the "
                "trial's error.txt)."
                if any(p.split(": ", 1)[0].endswith("/" + ERROR_PICKLE) for p in problems)
                else ""
            )
        )
    return checked


def listed_globals(path: str) -> dict[str, dict[str, set[str]]]:
    """``module.name`` -> how it is used (``import``, ``new``, ``call``) -> the files, for every pickle
    :func:`check_experiment_state` reads under ``path`` (to build or review the allow-list)."""
    out: dict[str, dict[str, set[str]]] = {}
    for where, data, kind in _state_pickles(path):
        blobs = (
            json_pickles(data.decode("utf-8", errors="replace"), where) if kind == "json" else [(where, data)]
        )
        for at, blob in blobs:
            scan = scan_pickle(blob)
            short = re.sub(r"\d{4}-\d\d-\d\d_[\d-]+", "*", posixpath.basename(at.split(" (")[0]))
            for m, n in scan.globals:
                use = "call" if (m, n) in scan.called else "new" if (m, n) in scan.created else "import"
                out.setdefault(f"{m}.{n}", {}).setdefault(use, set()).add(short)
    return out


if __name__ == "__main__":  # python -m vallex.tune.state_check <experiment folder>...
    seen: dict[str, set[str]] = {}
    for folder in sys.argv[1:]:
        for key, uses in listed_globals(folder).items():
            for use, files in uses.items():
                seen.setdefault(f"{key}\t{use}", set()).update(files)
    for key in sorted(seen):
        print(f"{key}\t{', '.join(sorted(seen[key]))}")

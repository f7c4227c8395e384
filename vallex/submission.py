"""Submitting a job file to a Ray cluster: the recipe behind ``ray_jobs/submit.py``.

:func:`submit` checks the whole config and the overrides (a typo fails here, not on the cluster),
submits the file's ``job.entrypoint`` (plus the overrides) with its ``job.runtime_env`` through Ray's
``JobSubmissionClient``, follows the job's logs and returns an exit status for it. A relative
``working_dir`` is resolved against the config file's folder, so it works from any directory.

Authentication: the cluster's Ray token (``RAY_AUTH_MODE=token``, docs/CLUSTER.md) goes as an
``Authorization: Bearer`` header, from the first of: a token file given by the caller, ``$RAY_AUTH_TOKEN``,
``$RAY_AUTH_TOKEN_PATH`` (a file), ``~/.ray/auth_token``. The token itself is never printed.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from pathlib import Path

from vallex.config import load_config

DEFAULT_ADDRESS = "http://127.0.0.1:8265"

# Exit statuses besides the job's own: what a shell script around submit.py can tell apart.
EXIT_CONFIG = 2
"""The config file or an override is wrong (nothing was sent)."""
EXIT_UNREACHABLE = 3
"""No Ray dashboard answered at the address."""
EXIT_AUTH = 4
"""The cluster wants a token and got none, or refused the one sent."""
EXIT_DETACHED = 130
"""Ctrl-C while following: the job keeps running."""


class SubmitError(Exception):
    """The job could not be submitted; ``exit_code`` says why (``EXIT_*``), the message what to do."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def build_submission(config: str, overrides: list[str]) -> tuple[str, dict]:
    """The entrypoint (with overrides appended, shell-quoted) and the resolved runtime_env.
    Raises :class:`vallex.config.ConfigError` for a bad config or override."""
    cfg = load_config(config, overrides)  # validates the whole run before anything is sent
    entrypoint = cfg.job.entrypoint
    if overrides:
        entrypoint += " " + " ".join(shlex.quote(o) for o in overrides)
    runtime_env = dict(cfg.job.runtime_env)
    base = Path(config).resolve().parent
    wd = runtime_env.get("working_dir")
    if isinstance(wd, str) and "://" not in wd and not wd.endswith(".zip"):
        runtime_env["working_dir"] = str((base / wd).resolve())
    return entrypoint, runtime_env


def auth_token(token_file: str | None = None) -> tuple[str | None, str]:
    """(token, where it came from) for Ray token authentication, or (None, "") when there is none:
    ``token_file``, then Ray's own order: $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token.
    A named file that cannot be read or is empty raises :class:`SubmitError`."""
    candidates = [
        ("--token-file " + token_file, token_file, None) if token_file else None,
        ("$RAY_AUTH_TOKEN", None, os.environ.get("RAY_AUTH_TOKEN")),
        ("$RAY_AUTH_TOKEN_PATH", os.environ.get("RAY_AUTH_TOKEN_PATH"), None),
    ]
    for c in candidates:
        if c is None:
            continue
        source, path, value = c
        if value is not None and value.strip():
            return value.strip(), source
        if path:
            try:
                text = Path(path).expanduser().read_text().strip()
            except OSError as e:
                raise SubmitError(f"cannot read the Ray auth token from {source} ({path}): {e}") from None
            if not text:
                raise SubmitError(f"the Ray auth token file {path} ({source}) is empty")
            return text, f"{source} ({path})"
    default = Path.home() / ".ray" / "auth_token"
    if default.is_file() and default.read_text().strip():
        return default.read_text().strip(), str(default)
    return None, ""


def auth_failure(address: str, source: str, error: Exception) -> str:
    """What to tell a user whose request the cluster refused (HTTP 401 without a token, 403 with one)."""
    where = "ray get-auth-token (on the head), or the KubeRay cluster's Secret (docs/CLUSTER.md)"
    if not source:
        return (
            f"the Ray cluster at {address} requires an authentication token (it runs with "
            f"RAY_AUTH_MODE=token) and none was found: set RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or "
            f"--token-file, or put it in ~/.ray/auth_token; the token comes from {where}"
        )
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return (
        f"the Ray cluster at {address} refused the token from {source} ({first}): it is not this "
        f"cluster's token; get the right one from {where}"
    )


def exit_code(status: str, driver_exit_code: int | None) -> int:
    """SUCCEEDED -> 0; FAILED -> the entrypoint's exit code (1 if unknown); anything else -> 1."""
    if status == "SUCCEEDED":
        return 0
    if status == "FAILED" and driver_exit_code:
        return int(driver_exit_code)
    return 1


def dashboard_address(address: str) -> str:
    """``host:8265`` -> ``http://host:8265``; URLs and ``auto`` unchanged."""
    return address if "://" in address or address == "auto" else "http://" + address


async def _follow(client, job_id: str) -> None:
    async for chunk in client.tail_job_logs(job_id):
        sys.stdout.write(chunk)
        sys.stdout.flush()


def submit(
    config: str,
    overrides: list[str],
    *,
    address: str = DEFAULT_ADDRESS,
    submission_id: str | None = None,
    token_file: str | None = None,
    follow: bool = True,
) -> int:
    """Submit ``config``'s job with ``overrides`` to the cluster at ``address``; print its logs as they
    come (``follow``) and return 0 when it SUCCEEDED, the entrypoint's exit code when it FAILED, 1 when
    it was STOPPED, 130 when Ctrl-C detached. Raises :class:`SubmitError` (config, reach, token) and
    :class:`vallex.config.ConfigError` before anything reaches a cluster."""
    entrypoint, runtime_env = build_submission(config, overrides)
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    address = dashboard_address(address)
    token, source = auth_token(token_file)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    if token:
        print(f"authenticating with the Ray token from {source}", file=sys.stderr, flush=True)
    try:
        client = JobSubmissionClient(address, headers=headers)
    except AuthenticationError as e:  # the version check is the first request: 401 / 403
        raise SubmitError(auth_failure(address, source, e), EXIT_AUTH) from None
    except Exception as e:  # connection refused, wrong port...
        raise SubmitError(f"cannot reach a Ray dashboard at {address}: {e}", EXIT_UNREACHABLE) from None
    print(f"uploading the working_dir and submitting to {address}", file=sys.stderr, flush=True)
    try:
        job_id = client.submit_job(
            entrypoint=entrypoint, runtime_env=runtime_env, submission_id=submission_id
        )
    except AuthenticationError as e:
        raise SubmitError(auth_failure(address, source, e), EXIT_AUTH) from None
    print(f"submitted {job_id} to {address}: {entrypoint}", flush=True)
    if not follow:
        print(f"follow: ray job logs --address {address} -f {job_id}")
        return 0
    try:
        asyncio.run(_follow(client, job_id))
    except KeyboardInterrupt:
        print(
            f"\ndetached; {job_id} keeps running. follow: ray job logs --address {address} -f {job_id}"
            f" | stop: ray job stop --address {address} {job_id}"
        )
        return EXIT_DETACHED
    info = client.get_job_info(job_id)
    while not info.status.is_terminal():  # the log stream can end a moment before the status does
        time.sleep(0.5)
        info = client.get_job_info(job_id)
    status = str(getattr(info.status, "value", info.status))
    code = exit_code(status, getattr(info, "driver_exit_code", None))
    print(f"job {job_id} {status} (exit {code})" + (f": {info.message}" if info.message else ""))
    return code

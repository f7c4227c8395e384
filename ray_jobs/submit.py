"""Submit job.yaml to a Ray cluster, follow its logs, and exit with the job's status.

    python ray_jobs/submit.py                                      # job.yaml to $RAY_ADDRESS or the local head
    python ray_jobs/submit.py --config job.yaml train.max_steps=50 # overrides are appended to the entrypoint
    python ray_jobs/submit.py --address http://head:8265 --no-follow

What it does:
  1. loads the config file and the overrides with the same checks as every entry point, so a typo
     fails here and not on the cluster;
  2. submits the file's `job.entrypoint` (plus the overrides) with the file's `job.runtime_env`
     through Ray's JobSubmissionClient; a relative `working_dir` is resolved against the config
     file's folder, so the command works from any directory;
  3. prints the job's logs as they come and exits 0 when the job SUCCEEDED, the entrypoint's own exit
     code when it FAILED (e.g. the demo's 1 when some language's validation loss did not fall), 1
     when the job was STOPPED. Ctrl-C detaches (the job keeps running) and prints how to follow it.

It is the same as `ray job submit --address ADDR --working-dir . -- <entrypoint>` with the runtime
env (excludes, env_vars, pip) read from the config file instead of typed on the command line.

Authentication: vallex's cluster configs run Ray with token authentication (RAY_AUTH_MODE=token;
docs/CLUSTER.md). submit.py sends the cluster's token as an `Authorization: Bearer` header, taken from
the first of: --token-file FILE, $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH (a file), ~/.ray/auth_token
(where `ray get-auth-token --generate` puts it). The token itself is never printed. A cluster that
wants a token and gets none or a wrong one ends the command with exit code 4 and what to do.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
from pathlib import Path

from vallex.config import ConfigError, load_config

DEFAULT_ADDRESS = "http://127.0.0.1:8265"


def build_submission(config: str, overrides: list[str]) -> tuple[str, dict]:
    """The entrypoint (with overrides appended, shell-quoted) and the resolved runtime_env."""
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
    ``token_file``, then Ray's own order: $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
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
                raise SystemExit(
                    f"submit.py: cannot read the Ray auth token from {source} ({path}): {e}"
                ) from None
            if not text:
                raise SystemExit(f"submit.py: the Ray auth token file {path} ({source}) is empty")
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


async def _follow(client, job_id: str) -> None:
    async for chunk in client.tail_job_logs(job_id):
        sys.stdout.write(chunk)
        sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="submit.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="job.yaml", help="the job file (default: job.yaml)")
    parser.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS,
        help=f"the cluster's dashboard address (default: $RAY_ADDRESS or {DEFAULT_ADDRESS})",
    )
    parser.add_argument("--submission-id", default=None, help="a job id to use (default: Ray picks one)")
    parser.add_argument(
        "--token-file",
        default=None,
        help="a file holding the cluster's Ray auth token (default: $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, "
        "then ~/.ray/auth_token)",
    )
    parser.add_argument(
        "--no-follow", action="store_true", help="print the job id and return at once, without logs"
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key.sub=value", help="config overrides, appended to the entrypoint"
    )
    args = parser.parse_args(argv)
    try:
        entrypoint, runtime_env = build_submission(args.config, args.overrides)
    except ConfigError as e:
        parser.exit(2, f"{parser.prog}: config error: {e}\n")

    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    address = args.address
    if "://" not in address and address != "auto":  # "host:8265" -> http://host:8265
        address = "http://" + address
    token, source = auth_token(args.token_file)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    if token:
        print(f"authenticating with the Ray token from {source}", file=sys.stderr, flush=True)
    try:
        client = JobSubmissionClient(address, headers=headers)
    except AuthenticationError as e:  # the version check is the first request: 401 / 403
        parser.exit(4, f"{parser.prog}: {auth_failure(address, source, e)}\n")
    except Exception as e:  # connection refused, wrong port...
        parser.exit(3, f"{parser.prog}: cannot reach a Ray dashboard at {address}: {e}\n")
    print(f"uploading the working_dir and submitting to {address}", file=sys.stderr, flush=True)
    try:
        job_id = client.submit_job(
            entrypoint=entrypoint, runtime_env=runtime_env, submission_id=args.submission_id
        )
    except AuthenticationError as e:
        parser.exit(4, f"{parser.prog}: {auth_failure(address, source, e)}\n")
    print(f"submitted {job_id} to {address}: {entrypoint}", flush=True)
    if args.no_follow:
        print(f"follow: ray job logs --address {address} -f {job_id}")
        return 0
    try:
        asyncio.run(_follow(client, job_id))
    except KeyboardInterrupt:
        print(
            f"\ndetached; {job_id} keeps running. follow: ray job logs --address {address} -f {job_id}"
            f" | stop: ray job stop --address {address} {job_id}"
        )
        return 130
    import time

    info = client.get_job_info(job_id)
    while not info.status.is_terminal():  # the log stream can end a moment before the status does
        time.sleep(0.5)
        info = client.get_job_info(job_id)
    status = str(getattr(info.status, "value", info.status))
    code = exit_code(status, getattr(info, "driver_exit_code", None))
    print(f"job {job_id} {status} (exit {code})" + (f": {info.message}" if info.message else ""))
    return code


if __name__ == "__main__":
    sys.exit(main())

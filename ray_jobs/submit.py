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
import os
import sys

from vallex.config import ConfigError
from vallex.submission import DEFAULT_ADDRESS, EXIT_CONFIG, SubmitError, submit


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
        return submit(
            args.config,
            args.overrides,
            address=args.address,
            submission_id=args.submission_id,
            token_file=args.token_file,
            follow=not args.no_follow,
        )
    except ConfigError as e:
        parser.exit(EXIT_CONFIG, f"{parser.prog}: config error: {e}\n")
    except SubmitError as e:
        parser.exit(e.exit_code, f"{parser.prog}: {e}\n")


if __name__ == "__main__":
    sys.exit(main())

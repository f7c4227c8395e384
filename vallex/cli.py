"""Shared command-line handling for the ``ray_jobs`` entry points.

Every entry point takes ``--config FILE`` followed by ``key.sub=value`` overrides, and its ``--help``
lists the config keys it reads with their defaults and documentation.
"""

from __future__ import annotations

import argparse

from vallex.config import Config, ConfigError, check_local_paths, config_help, load_config


class _ConfigParser(argparse.ArgumentParser):
    """Lists the config keys of ``sections`` under ``--help``, built only when help is shown: reading
    every field's docstring from the source costs seconds on a busy machine, at every entry point's start."""

    def __init__(self, sections: tuple[str, ...], **kwargs):
        super().__init__(**kwargs)
        self._sections = sections

    def format_help(self) -> str:
        if self.epilog is None:
            self.epilog = "config keys (set in the YAML file or override as key.sub=value):\n" + config_help(
                sections=self._sections
            )
        return super().format_help()


def parse_config(
    description: str,
    sections: tuple[str, ...],
    argv: list[str] | None = None,
    default_config: str | None = "job.yaml",
) -> tuple[Config, argparse.Namespace]:
    """Parse ``--config FILE key=value ...``; exit with a clear message on a bad config."""
    parser = _ConfigParser(
        sections,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        default=default_config,
        help=f"YAML config file (default: {default_config}); its sections are listed below",
    )
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override one config field")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        check_local_paths(cfg)
    except ConfigError as e:
        parser.exit(2, f"{parser.prog}: config error: {e}\n")
    return cfg, args

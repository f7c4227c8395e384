"""vallex.logs: what reaches the terminal and what the run's log file keeps."""

from __future__ import annotations

import logging

from vallex.logs import setup_logging


def test_log_file_keeps_debug_from_vallex_and_info_from_the_libraries(tmp_path, capsys):
    path = tmp_path / "logs" / "run.log"
    root = logging.getLogger()
    before = list(root.handlers), root.level
    try:
        log = setup_logging(path)
        log.debug("vallex detail")
        log.info("vallex news")
        logging.getLogger("matplotlib.font_manager").debug("findfont: score(...)")
        logging.getLogger("matplotlib").warning("matplotlib warning")
        logging.getLogger("urllib3").info("urllib3 info")
        for h in root.handlers:
            h.flush()
    finally:
        for h in list(root.handlers):
            if getattr(h, "_vallex", False):
                root.removeHandler(h)
                h.close()
        root.handlers[:] = before[0]
        root.setLevel(before[1])
    text = path.read_text()
    for kept in ("vallex detail", "vallex news", "matplotlib warning"):
        assert kept in text, kept
    assert "urllib3 info" in text and "findfont" not in text
    err = capsys.readouterr().err  # the terminal: vallex's INFO and above, nothing else
    assert "vallex news" in err and "vallex detail" not in err and "matplotlib warning" not in err

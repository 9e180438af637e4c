"""The command line's own behaviour: what it shows on stderr."""

from __future__ import annotations

import logging

from autocomp.cli import main


def test_library_warnings_show_without_verbose_and_details_only_with_it(capsys):
    log = logging.getLogger("autocomp.some_plugin")
    assert main(["plugins", "--json"]) == 0
    capsys.readouterr()
    log.warning("calibration from another host")
    log.info("a detail")
    log.warning("trial 3 failed: boom", extra={"event": "trial_failed"})  # the search's progress prints it
    err = capsys.readouterr().err
    assert "calibration from another host" in err
    assert "a detail" not in err and "trial 3 failed" not in err

    assert main(["-v", "plugins", "--json"]) == 0
    capsys.readouterr()
    log.info("a detail")
    log.warning("once")
    err = capsys.readouterr().err
    assert "a detail" in err and err.count("once") == 1  # one handler however often main() ran
    main(["plugins", "--json"])  # back to warnings only

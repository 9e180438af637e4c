"""The command line's own behaviour: what it shows on stderr."""

from __future__ import annotations

import logging

from autocomp import cli
from autocomp.cli import main


def test_a_library_warning_shows_without_verbose_once_and_the_logger_is_left_as_found(registry, monkeypatch,
                                                                                         capsys):
    from autocomp_plugins import cpu_predictor as cp

    monkeypatch.setattr(cp, "host_identity", lambda: {**cp.read_calibrations(cp.SHIPPED_CALIBRATION)[0].host,
                                                      "cpu_model": "Imaginary CPU 9000"})
    log = logging.getLogger("autocomp")
    handlers, level = list(log.handlers), log.level
    assert main(["targets"]) == 0
    err = " ".join(capsys.readouterr().err.split())  # rich wraps lines
    # the cpu target's predictor falls back to the shipped calibration of another host, and says so
    assert err.count("WARNING: cpu predictor: it was calibrated on another host") == 1
    assert "Imaginary CPU 9000" in err and "autocomp calibrate --target cpu" in err
    assert log.handlers == handlers and log.level == level


def test_details_only_with_verbose_and_events_the_cli_prints_itself_are_left_out(capsys):
    log = logging.getLogger("autocomp.some_plugin")
    with cli._log_to_stderr(logging.WARNING):
        log.info("a detail")
        log.warning("trial 3 failed: boom", extra={"event": "trial_failed"})  # the search's progress prints it
        log.warning("a warning")
        log.warning("a warning")
    log.warning("after the command")
    err = capsys.readouterr().err
    assert "a detail" not in err and "trial 3 failed" not in err and "after the command" not in err
    assert err.count("a warning") == 1
    with cli._log_to_stderr(logging.INFO):
        log.info("a detail")
        with cli._log_to_stderr(logging.INFO, "served: %(message)s"):  # agent serve's replaces main's
            log.warning("one line")
    err = capsys.readouterr().err
    assert "a detail" in err and err.count("one line") == 1 and "served: one line" in err


def test_an_unexpected_exception_exits_4_with_a_message_not_1(monkeypatch, capsys):
    """A bug (autocomp's or a plugin's) must not exit 1, which says "no candidate met the
    constraints" to a nightly job; the traceback shows with -v only. The message is printed as it
    is: brackets in it are not read as markup (rich would drop them, or raise on "[/tmp]")."""
    def broken(args):
        raise RuntimeError("a plugin's parameters() blew up on shape [batch, channels] in [/tmp]")

    monkeypatch.setattr(cli, "_cmd_targets", broken)
    assert main(["targets"]) == 4
    err = " ".join(capsys.readouterr().err.split())
    assert "error: unexpected RuntimeError: a plugin's parameters() blew up on shape [batch, channels] in [/tmp]" in err
    assert "run again with -v for its traceback" in err and "Traceback" not in err
    assert main(["-v", "targets"]) == 4
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "its traceback is above" in " ".join(err.split())


def test_a_machine_error_exits_4_without_calling_itself_a_bug(monkeypatch, capsys):
    def full(args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cli, "_cmd_targets", full)
    assert main(["targets"]) == 4
    err = " ".join(capsys.readouterr().err.split())
    assert "error: OSError: [Errno 28] No space left on device" in err and "bug" not in err


def test_a_configuration_error_names_its_table(tmp_path, registry, capsys):
    """A SpaceError's [table] prefix is shown, not swallowed as markup."""
    space = tmp_path / "bad.toml"
    space.write_text("[prune]\nratio = [0.9, 0.1]\n")
    assert main(["space", "show", "--workload", "digits-tiny", "--space", str(space)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "[prune.ratio]" in err and "low <= high" in err


def test_plugins_lists_the_skipped_ones_with_their_reason(monkeypatch, capsys):
    import types

    from autocomp import hookimpl
    from autocomp.plugins import load_registry, reset_registry

    from .conftest import builtin_plugins

    module = types.ModuleType("bad_plugin")
    module.register_methods = hookimpl(lambda register: register(object()), specname="register_methods")
    reset_registry(load_registry(entry_points=[], extra_plugins=[*builtin_plugins(), ("bad", module)]))
    monkeypatch.setenv("COLUMNS", "400")  # one table row per line
    capsys.readouterr()  # the warning logged while loading, if any reached stderr: only the command's output counts
    try:
        assert main(["plugins"]) == 0
    finally:
        reset_registry(None)
    err = " ".join(capsys.readouterr().err.split())
    assert "skipped plugins" in err and "bad" in err and "not an instance of autocomp.Method" in err
    assert "prune" in err  # the others are listed as before

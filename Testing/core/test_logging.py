"""Log lines: the core package logs through `logging.getLogger("meddinov3.<module>")`; the command line sends them to
stderr tagged with the command, as the lines the Slicer modules' log views show."""

import logging

from meddinov3.cli.logs import LineFormatter, StderrHandler, configure_logging


def _line(name: str, level: int, message: str) -> str:
    return LineFormatter().format(logging.LogRecord(name, level, __file__, 1, message, None, None))


def test_lines_are_tagged_with_the_command_and_warnings_marked():
    assert _line("meddinov3.train.loop", logging.INFO, "resumed from x at step 4") == \
        "[meddinov3 train] resumed from x at step 4"
    assert _line("meddinov3.pretrain.loop", logging.WARNING, "possible collapse") == \
        "[meddinov3 pretrain] WARNING: possible collapse"
    assert _line("meddinov3.runs.metrics", logging.WARNING, "matplotlib is not installed") == \
        "[meddinov3] WARNING: matplotlib is not installed"


def test_cli_handler_is_installed_once_and_writes_to_the_current_stderr(monkeypatch, capsys):
    logger = logging.getLogger("meddinov3")
    monkeypatch.setattr(logger, "handlers", [])
    monkeypatch.setattr(logger, "level", logging.NOTSET)
    monkeypatch.setenv("RANK", "0")
    configure_logging()
    configure_logging()  # the CLI run twice in one process: still one line per message
    assert [type(h) for h in logger.handlers] == [StderrHandler]
    logging.getLogger("meddinov3.train.loop").info("step 1/2")
    assert capsys.readouterr().err == "[meddinov3 train] step 1/2\n"
    monkeypatch.setattr(logger, "handlers", [])
    monkeypatch.setenv("RANK", "1")  # another rank of a torchrun job: warnings only
    configure_logging()
    logging.getLogger("meddinov3.train.loop").info("step 1/2")
    logging.getLogger("meddinov3.train.loop").warning("label 2 has no voxels")
    assert capsys.readouterr().err == "[meddinov3 train] WARNING: label 2 has no voxels\n"


def test_an_exception_while_a_line_is_written_propagates(monkeypatch):
    """A signal handler's exception (SIGTERM during a run's start-up: RunStopped) raised while a line is written
    must stop the run, as it did when the lines were printed; `logging` would otherwise swallow it."""
    import pytest

    from meddinov3.runs import RunStopped

    class Interrupted:
        def write(self, text):
            raise RunStopped("SIGTERM")

        def flush(self):
            pass

    logger = logging.getLogger("meddinov3")
    monkeypatch.setattr(logger, "handlers", [])
    monkeypatch.setattr(logger, "level", logging.NOTSET)
    monkeypatch.setenv("RANK", "0")
    configure_logging()
    monkeypatch.setattr("sys.stderr", Interrupted())
    with pytest.raises(RunStopped):
        logging.getLogger("meddinov3.train.loop").info("preprocessing 2 case(s)")

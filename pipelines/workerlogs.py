"""Keep the own output of local worker processes off the terminal.

The DirectRunner's ``multi_processing`` mode starts each worker as a subprocess that inherits
this process's stderr. A worker logs to that stderr before it reads the pipeline's log level
(Beam's bootstrap logging, import-time notes of optional cloud clients), so those lines would
cut through the live progress table; what it logs later also reaches the runner, which logs it
as this process logs Beam. :func:`worker_stderr_to_file` points file descriptor 2, which children
inherit, at a file for the length of a run, while this process keeps writing to the terminal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Iterator

log = logging.getLogger(__name__)


def _terminal_handlers(stream) -> list[logging.StreamHandler]:
    handlers = [*logging.getLogger().handlers]
    for name in logging.Logger.manager.loggerDict:
        handlers += getattr(logging.getLogger(name), "handlers", [])
    return [
        h
        for h in handlers
        if isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) is stream
    ]


@contextlib.contextmanager
def worker_stderr_to_file() -> Iterator[str]:
    """Send what child processes write to stderr into a temporary file; yield its path.

    ``sys.stderr`` and the logging handlers that wrote to it keep writing to the terminal. The
    file is removed when the block ends normally; after an error it is kept and named in a
    warning, since a worker that died may have said why only there.
    """
    sys.stderr.flush()
    fd, path = tempfile.mkstemp(prefix="groundforge-workers-", suffix=".log")
    terminal = os.dup(2)
    previous = sys.stderr
    shown = os.fdopen(terminal, "w", buffering=1, encoding=getattr(previous, "encoding", None))
    found = _terminal_handlers(sys.__stderr__) + _terminal_handlers(previous)
    handlers = {h: h.stream for h in found}
    os.dup2(fd, 2)
    os.close(fd)
    sys.stderr = shown
    for handler in handlers:
        handler.setStream(shown)
    failed = False
    try:
        yield path
    except BaseException:
        failed = True
        raise
    finally:
        shown.flush()
        os.dup2(terminal, 2)
        sys.stderr = previous
        for handler, stream in handlers.items():
            handler.setStream(stream)
        shown.close()
        if failed and os.path.getsize(path):
            log.warning("the worker processes' own output is in %s", path)
        else:
            os.remove(path)

"""The console is for the user: raydpo's own lines go to the terminal, Ray's and DeepSpeed's chatter to a log file.

Redirection is at the file-descriptor level, because Ray's C++ core and DeepSpeed's op builder write to fds 1 and 2
directly, not through Python's sys.stdout.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

from core.errors import RaydpoError

TAIL_LINES = 40


@contextlib.contextmanager
def user_console(log_file: Path) -> Iterator[Callable[[str], None]]:
    """Yields say(line). Everything else printed meanwhile lands in log_file; on failure its tail is shown."""
    log_file = Path(log_file)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(saved_out), "w", buffering=1)
    log_fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def say(line: str) -> None:
        terminal.write(f"[raydpo {time.strftime('%H:%M:%S')}] {line}\n")
        terminal.flush()

    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    try:
        yield say
    except RaydpoError:
        raise  # a user error says what to do; the log's tail would only bury it
    except BaseException:
        sys.stdout.flush()
        sys.stderr.flush()
        tail = log_tail(log_file)
        if tail:
            terminal.write(f"--- last lines of {log_file} ---\n{tail}\n--- end of log ---\n")
        raise
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        for fd in (saved_out, saved_err, log_fd):
            os.close(fd)
        terminal.close()


def log_tail(path: Path, lines: int = TAIL_LINES) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])

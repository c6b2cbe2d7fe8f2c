"""What every command-line entry point shares: how it ends.

`run_main(body)` maps the ways a run can end to exit codes and at most one line on stderr:

    0    done
    2    `UserError` (bad input), or an OSError of the environment (disk full, read-only folder,
         permission denied): `error: <message>`
    130  Ctrl-C / SIGINT: `error: interrupted`; the entry point's own cleanup (temporary
         directories) runs on the way out, and tracebacks of orbax's worker threads are muted
    141  stdout closed early (`| head -1`): no message, like any Unix filter

Anything else is a bug and keeps its traceback. The library's own warnings (`warnings.warn` in
pali_jax) show as one line on stderr, `warning: <message>`: what the user should know, not where
in the code it was said.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import pali_jax
from pali_jax.errors import UserError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose mistakes are `UserError`s: one line and exit code 2 under
    `run_main` (argparse would print the usage too, and exit on its own)."""

    def error(self, message: str):
        raise UserError(f"{message} (see --help)")


def os_error_message(e: OSError) -> str:
    """One line for an OSError, naming the file when known (`No space left on device: /out/x`)."""
    reason = e.strerror or " ".join(str(e).split()) or type(e).__name__
    return f"{reason}: {e.filename}" if e.filename else reason


def _mute_thread_tracebacks() -> None:
    """After an interrupt, worker threads (orbax's writers) die with the main thread's cleanup:
    their tracebacks would bury the one line that matters."""
    threading.excepthook = lambda args: None


def _orbax_thread_hook(args: threading.ExceptHookArgs) -> None:
    """orbax's writer threads print their exception before handing it to the main thread, which
    raises it again (and reports it): print those once, from the main thread. Other threads'
    exceptions keep Python's report."""
    tb, frames = args.exc_traceback, []
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_filename)
        tb = tb.tb_next
    if not any("/orbax/" in f for f in frames):
        threading.__excepthook__(args)


def _closed_loop_hook(kind, value, tb) -> None:
    """After a failed write, tensorstore completes the writes orbax abandoned and reports each
    one's callback into orbax's closed event loop ("Event loop is closed"): noise after the error
    that was already reported. Everything else keeps Python's report."""
    if not (kind is RuntimeError and str(value) == "Event loop is closed"):
        sys.__excepthook__(kind, value, tb)


_LIBRARY = Path(pali_jax.__file__).resolve().parent
_show_warning_python = warnings.showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """pali_jax's warnings as `warning: <message>` on stderr; others as Python shows them."""
    if not Path(filename).resolve().is_relative_to(_LIBRARY):
        _show_warning_python(message, category, filename, lineno, file, line)
        return
    print(f"warning: {message}", file=sys.stderr if file is None else file)


def run_main(body: Callable[[], int | None], describe: Callable[[UserError], str] = str) -> int:
    """Runs `body` and returns its exit code (see the module docstring)."""
    threading.excepthook = _orbax_thread_hook
    sys.excepthook = _closed_loop_hook
    warnings.showwarning = _show_warning
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)  # from here on, cleanup must run
    try:
        return body() or 0
    except UserError as e:
        print(f"error: {describe(e)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        _mute_thread_tracebacks()
        print("error: interrupted", file=sys.stderr)
        if pali_jax.RUN_AS_COMMAND:
            # The cleanup has run (the exception unwound every `finally`); tearing the interpreter
            # down under XLA's and orbax's running threads can crash (SIGSEGV), so leave at once.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_INTERRUPTED)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # Python would print a second error when it flushes stdout at exit: point it at /dev/null.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except OSError as e:
        print(f"error: {os_error_message(e)}", file=sys.stderr)
        return EXIT_USER_ERROR
    finally:
        if pali_jax.RUN_AS_COMMAND and threading.current_thread() is threading.main_thread():
            # The outcome is decided: a Ctrl-C during the interpreter's exit would only add a traceback.
            signal.signal(signal.SIGINT, signal.SIG_IGN)

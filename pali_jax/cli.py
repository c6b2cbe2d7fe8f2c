"""The `pali-jax` command: one table of subcommands, one way to parse their flags, one way to end.

    pali-jax COMMAND [ARGS]        (pali-jax --help lists the commands; pali-jax COMMAND --help its flags)

`COMMANDS` names each subcommand's function (`module:function`, called with its arguments and its
program name) and one line of help; the module is imported only when its command runs, so that
`pali-jax --help` and a mistyped command answer at once. A new subcommand is one line there.
`run_generate.py` and `python -m convert.*` / `python -m pali_jax.annotate` / `... .finetune` call
`console` with their command's name.

Every command ends the same way (`run_main`), with an exit code and at most one line on stderr:

    0    done
    2    `UserError` (bad input, including a bad flag: `OneLineParser` never prints argparse's usage),
         or an OSError of the environment (disk full, read-only folder, permission denied):
         `error: <message>`
    130  Ctrl-C / SIGINT: `error: interrupted`, also during the seconds of imports before the work
         starts (`console` catches it until `run_main` takes over); the command's own cleanup
         (temporary files and directories) runs on the way out, and tracebacks of orbax's worker
         threads are muted
    141  stdout closed early (`| head -1`): no message, like any Unix filter

Anything else is a bug and keeps its traceback.

This module imports nothing heavy at its top (the package's `__init__` is lazy too): what runs
before the early Ctrl-C handler is installed is Python's own start.

The library's own warnings (`warnings.warn` in pali_jax) show as one line on stderr,
`warning: <message>`: what the user should know, not where in the code it was said.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pali_jax.errors import UserError

if TYPE_CHECKING:
    from pali_jax.generation_config import GenerationConfig

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141

PROG = "pali-jax"
# name: ("module:function", help). The function takes (argv, prog) and parses and runs the command.
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("pali_jax.generate_command:command", "caption, answer, detect or segment a few images"),
    "annotate": ("pali_jax.annotate:command", "a resumable job over a dataset, into a JSONL results file"),
    "finetune": ("pali_jax.finetune:command", "fine-tune on JSONL data; exports a model directory"),
    "convert": ("pali_jax.conversion:convert_command", "Hugging Face checkpoint -> pali-jax directory"),
    "convert-big-vision": ("pali_jax.conversion:big_vision_command", "big_vision .npz -> pali-jax directory"),
    "export-big-vision": ("pali_jax.conversion:export_command", "pali-jax directory -> big_vision .npz"),
    "verify": ("pali_jax.conversion:verify_command", "check a pali-jax directory against its manifest"),
    "evaluate": ("pali_jax.evaluate:command", "score answers with a task's standard metrics (CIDEr, VQA accuracy, mAP, ...)"),
    "serve": ("pali_jax.serve:command", "an OpenAI-compatible HTTP server (chat completions, boxes and masks as data)"),
}


class OneLineParser(argparse.ArgumentParser):
    """The argument parser of every command: a mistake is a `UserError` (one line and exit code 2
    under `run_main`; argparse would print its usage too, and exit on its own)."""

    def error(self, message: str):
        raise UserError(f"{message} (see --help)")


def warn(message: str) -> None:
    """How a command reports what it skipped: one `warning:` line on stderr."""
    print(f"warning: {message}", file=sys.stderr)


def os_error_message(e: OSError) -> str:
    """One line for an OSError, naming the file when known (`No space left on device: /out/x`)."""
    reason = e.strerror or " ".join(str(e).split()) or type(e).__name__
    return f"{reason}: {e.filename}" if e.filename else reason


# -- the generation flags (generate, annotate) ---------------------------------------------------
# `GenerationConfig`'s fields (and the jobs' sizes) as flags, so that a refused value is named as typed.
FLAGS = {
    "max_new_tokens": "--max-tokens", "temperature": "--temperature", "top_k": "--top-k", "top_p": "--top-p",
    "beams": "--beams", "seed": "--seed", "batch_size": "--batch-size", "slots": "--slots",
}


def add_generation_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of every command that generates: decoding, dtype, masks, compilation cache, mesh."""
    from pali_jax.sharding import add_mesh_arguments

    p.add_argument("--max-tokens", type=int, default=32, help="new tokens at most (the seed's max_tokens_to_generate)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--greedy", action="store_true", help="greedy decoding (the default)")
    mode.add_argument("--sample", action="store_true", help="sample (the seed's do_sample=True)")
    p.add_argument("--temperature", type=float, help="sampling temperature (implies --sample; default 1.0)")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens (implies --sample)")
    p.add_argument("--top-p", type=float, help="nucleus sampling threshold (implies --sample)")
    p.add_argument("--beams", type=int, default=1, help="beam search width (deterministic)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--seg-vae", metavar="PATH", help="big_vision's vae-oid.npz: decode `segment` answers into masks "
                                                    "(default: $PALI_JAX_SEG_VAE)")
    p.add_argument("--compilation-cache", metavar="DIR", help="persistent XLA cache (default ~/.cache/pali_jax/xla)")
    p.add_argument("--no-compilation-cache", action="store_true")
    add_quantize_arguments(p)
    add_mesh_arguments(p)


def add_quantize_arguments(p: argparse.ArgumentParser) -> None:
    """--quantize and --group-size, as the generating commands, `finetune` and `convert` take them
    (checked by `pali_jax.quantize.parse`, which names the schemes)."""
    p.add_argument("--quantize", metavar="SCHEME",
                   help="int8 (per output channel) or int4 (groups along the contracted axis): weight-only "
                        "quantisation of the projections, embedding and SigLIP, done as the weights are read")
    p.add_argument("--group-size", type=int, metavar="N", help="int4's group size (default 128)")


def generation_config(args: argparse.Namespace, **fields) -> GenerationConfig:
    """The generation flags' `GenerationConfig` (plus `fields`), checked before any model loads
    (and --quantize with it: a bad scheme fails before anything is read or written)."""
    from pali_jax.generation_config import GenerationConfig
    from pali_jax.quantize import parse

    parse(args.quantize, args.group_size)

    knobs = args.temperature is not None or args.top_k is not None or args.top_p is not None
    if args.greedy and knobs:
        raise UserError("--greedy conflicts with --temperature / --top-k / --top-p (see --help)")
    temperature = 1.0 if args.sample and args.temperature is None else args.temperature
    return GenerationConfig(max_new_tokens=args.max_tokens, temperature=temperature, top_k=args.top_k,
                            top_p=args.top_p, beams=args.beams, seed=args.seed, **fields)


def error_line(error: UserError) -> str:
    """The line printed for a `UserError`; an option's error names the flag instead of the field."""
    message, parameter = str(error), getattr(error, "parameter", None)
    if parameter in FLAGS and message.startswith(parameter):
        return FLAGS[parameter] + message[len(parameter):]
    return message


# -- how a command ends --------------------------------------------------------------------------
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


_LIBRARY = Path(__file__).resolve().parent
_show_warning_python = warnings.showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """pali_jax's warnings as `warning: <message>` on stderr; others as Python shows them."""
    if not Path(filename).resolve().is_relative_to(_LIBRARY):
        _show_warning_python(message, category, filename, lineno, file, line)
        return
    print(f"warning: {message}", file=sys.stderr if file is None else file)


def run_main(body: Callable[[], int | None], *, process: bool = False) -> int:
    """Runs `body` and returns its exit code (see the module docstring). `process`: this is the
    whole process (`console`): after an interrupt, leave at once instead of unwinding further."""
    threading.excepthook = _orbax_thread_hook
    sys.excepthook = _closed_loop_hook
    warnings.showwarning = _show_warning
    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # from here on, cleanup must run
    try:
        return body() or 0
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    except UserError as e:
        print(f"error: {error_line(e)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        _mute_thread_tracebacks()
        print("error: interrupted", file=sys.stderr)
        if process:
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
        if process and main_thread:
            # The outcome is decided: a Ctrl-C during the interpreter's exit would only add a traceback.
            signal.signal(signal.SIGINT, signal.SIG_IGN)


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"usage: {PROG} COMMAND [ARGS]  ({PROG} COMMAND --help: its flags)", "",
             "PaliGemma 1 and 2 in JAX/Flax.", "", "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None, *, process: bool = False) -> int:
    """`pali-jax COMMAND ARGS...` in this process (tests call it; `console` is the real command).
    Returns the exit code."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    if argv[:1] in (["-h"], ["--help"]):
        print(_usage())
        return 0
    name, rest = (argv[0], argv[1:]) if argv else ("", [])
    if name not in COMMANDS:
        given = f"unknown command {name!r}" if name else "no command given"
        print(f"error: {given}: choose from {', '.join(COMMANDS)} (see {PROG} --help)", file=sys.stderr)
        return EXIT_USER_ERROR
    module, function = COMMANDS[name][0].split(":")
    command = getattr(importlib.import_module(module), function)
    return run_main(lambda: command(rest, f"{PROG} {name}"), process=process)


def _interrupted_early(signum, frame) -> None:  # noqa: ARG001
    os.write(2, b"error: interrupted\n")
    os._exit(EXIT_INTERRUPTED)


def console(command: str | None = None) -> int:
    """The process entry point: `pali-jax` (console script), or one command's wrapper
    (`run_generate.py`: `console("generate")`). Ctrl-C during the imports ends in one line."""
    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupted_early)
    argv = sys.argv[1:] if command is None else [command, *sys.argv[1:]]
    return main(argv, process=True)

"""Generated files: ``ai-service asyncapi``, ``openapi`` and ``supervisor-config``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ai_service.cli.base import EXIT_CODES_HELP, CommandError, ExitCode, err
from ai_service.config import ConfigError, Settings


def add_documents(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    """``asyncapi``, ``openapi`` and ``supervisor-config``: files generated from the code."""
    p = _document_parser(
        sub, fmt, "asyncapi", "print the AsyncAPI 3.0 document of the message contract",
        "Generate the AsyncAPI 3.0.0 document (docs/asyncapi.yaml) from the pydantic\n"
        "message models and the default settings.",
    )
    p.add_argument("--env", action="store_true",
                   help="use the queue, exchange and broker names of this environment instead of the defaults")
    p.set_defaults(func=cmd_asyncapi)
    p = _document_parser(
        sub, fmt, "openapi", "print the OpenAPI 3 document of the worker HTTP API",
        "Generate the OpenAPI document (docs/openapi.json) of the workers' HTTP API from\n"
        "its routes and the pydantic message models.",
    )
    p.set_defaults(func=cmd_openapi)
    _add_supervisor_config(sub, fmt)


def _document_parser(sub: Any, fmt: type[argparse.HelpFormatter], name: str, help_: str,
                     description: str) -> argparse.ArgumentParser:
    """A subcommand that prints a generated document, writes it (-o) or checks a copy (--check)."""
    p: argparse.ArgumentParser = sub.add_parser(name, help=help_, formatter_class=fmt, description=description,
                                                epilog=EXIT_CODES_HELP)
    p.add_argument("-o", "--output", type=Path, help="write it to this file instead of stdout")
    p.add_argument("--check", type=Path, metavar="FILE",
                   help="exit 1 if FILE differs from the generated document (stale)")
    p.set_defaults(needs_settings=False)
    return p


def _add_supervisor_config(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    from ai_service.supervisor import DEFAULT_OUTPUT, OPS, parse_gpus

    def gpus(text: str) -> Any:
        """A GPU list as argparse sees it: a bad one is a usage error naming the flag."""
        from ai_service.supervisor import GpuListError

        try:
            return parse_gpus(text)
        except GpuListError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    p = sub.add_parser(
        "supervisor-config", help="write supervisord's worker programs (the GPU split) to supervisor.d/workers.conf",
        formatter_class=fmt,
        description="Write the include that supervisord.conf pulls in: group `ai` with one program per\n"
        "operation and GPU (`train-gpu0`, ...), each pinned with CUDA_VISIBLE_DEVICES=<gpu>, or one\n"
        "`<op>-cpu0` of each kind (CUDA_VISIBLE_DEVICES=\"\") without a GPU. An operation whose list is\n"
        "not given gets every GPU that `nvidia-smi` lists (narrowed by CUDA_VISIBLE_DEVICES), else the\n"
        "CPU. GPUS: 0-3, 0,2,5, 0-1,6, none (no worker of that kind), cpu, cpu:N.\n"
        "Apply a new split with `supervisorctl reread && supervisorctl update` (restarts group ai warmly).",
        epilog=EXIT_CODES_HELP,
    )
    for op in OPS:
        p.add_argument(f"--{op}-gpus", type=gpus, metavar="GPUS", dest=f"{op}_gpus",
                       help=f"where the {op} workers run (default: every detected GPU, else the CPU)")
    p.add_argument("-o", "--output", default=str(DEFAULT_OUTPUT), metavar="PATH|-",
                   help=f"write here, `-` for stdout (default {DEFAULT_OUTPUT}, beside supervisord.conf in the "
                        "current directory)")
    p.set_defaults(func=cmd_supervisor_config, needs_settings=False)


def cmd_openapi(args: argparse.Namespace) -> ExitCode:
    """The OpenAPI document of every operation's HTTP routes."""
    from ai_service.http.openapi import render

    return write_document(render(), args, "openapi")


def cmd_asyncapi(args: argparse.Namespace) -> ExitCode:
    """The AsyncAPI document of the registry's operations (``--env``: this environment's names)."""
    from ai_service.asyncapi import render

    settings = None
    if args.env:
        try:
            settings = Settings.from_env()
        except ConfigError as exc:
            raise CommandError(ExitCode.USAGE, f"configuration error: {exc}") from None
    return write_document(render(settings, args.operations), args, "asyncapi")


def write_document(text: str, args: argparse.Namespace, command: str) -> ExitCode:
    """Print ``text``, write it to ``--output``, or compare it with ``--check``."""
    if args.check is not None:
        try:
            current = args.check.read_text(encoding="utf-8")
        except OSError as exc:
            raise CommandError(ExitCode.FAILED, f"cannot read {args.check}: {exc.strerror or exc}") from None
        if current != text:
            raise CommandError(ExitCode.FAILED, f"{args.check} is stale: regenerate it with "
                               f"`ai-service {command} -o {args.check}`")
        err(f"{args.check} is up to date")
        return ExitCode.OK
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text, encoding="utf-8")
        err(f"wrote {args.output}")
        return ExitCode.OK
    sys.stdout.write(text)
    return ExitCode.OK


def cmd_supervisor_config(args: argparse.Namespace) -> ExitCode:
    """Write (or print) supervisord's programs: one per operation and GPU."""
    from ai_service.supervisor import DEFAULT_OUTPUT, OPS, GpuListError, build_layout, render, slots, write_atomically

    given = {op: getattr(args, f"{op}_gpus") for op in OPS}
    layout, how = build_layout(given)
    try:
        text = render(layout, how)
    except GpuListError as exc:
        raise CommandError(ExitCode.USAGE, str(exc)) from None
    names = ", ".join(slot.name for slot in slots(layout))
    if args.output == "-":
        sys.stdout.write(text)
        err(f"{how}; programs: {names}")
        return ExitCode.OK
    output = Path(args.output)
    if args.output == str(DEFAULT_OUTPUT) and not Path("supervisord.conf").is_file():
        raise CommandError(ExitCode.USAGE, f"no supervisord.conf here ({Path.cwd()}): run this from the directory "
                           "that holds it (the checkout), or pass --output")
    try:
        write_atomically(output, text)
    except OSError as exc:
        raise CommandError(ExitCode.FAILED, f"cannot write {output}: {exc.strerror or exc}") from None
    err(f"wrote {output} ({how}); programs: {names}\n"
        "a running supervisord picks it up with `supervisorctl reread && supervisorctl update`")
    return ExitCode.OK

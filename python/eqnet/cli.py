"""The `eqnet` command line: train, search, export, eval, export-onnx, demo.

Each subcommand lives in its own module under eqnet.commands, with `add_arguments(parser)` and
`run(args) -> int`; modules are imported only when their subcommand runs, so `eqnet --help`
stays fast and a missing optional dependency fails only the command that needs it.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "train": ("eqnet.commands.train", "train a float, QAT or elastic supernet"),
    "search": ("eqnet.commands.search", "search mixed-precision configs under a budget"),
    "export": ("eqnet.commands.export", "export a trained supernet to one .eqk file"),
    "eval": ("eqnet.commands.eval", "evaluate an .eqk file at each width (integer runtime)"),
    "export-onnx": ("eqnet.commands.export_onnx", "export one subnet as ONNX QDQ"),
    "demo": ("eqnet.commands.demo", "the end-to-end job on the embedded digits data"),
}


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eqnet", description=__doc__.splitlines()[0])
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", help="show the full traceback of a failure")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of a failure")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, parents=[debug])
        if name == selected:
            importlib.import_module(module_name).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    selected = next((a for a in argv if not a.startswith("-")), None)
    if selected is not None and selected not in COMMANDS:
        build_parser().parse_args(argv)  # prints the usage error and exits 2
    parser = build_parser(selected)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(COMMANDS[args.command][0])
    if args.debug:
        return int(module.run(args) or 0)
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print(f"eqnet {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one line instead of a traceback; --debug shows it
        print(f"eqnet {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return 1


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message, with its type when that says more, and never
    a suggestion to unpickle untrusted data."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    if "weights_only" in text:
        first = "the file holds objects other than tensors and plain containers (not loaded)"
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror}{where}"
    if not first:
        return type(exc).__name__
    if isinstance(exc, ValueError | FileNotFoundError):
        return first
    return f"{type(exc).__name__}: {first}"


if __name__ == "__main__":
    sys.exit(main())

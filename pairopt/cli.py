"""`pairopt COMMAND ...`: a thin dispatcher; each command is a `main(argv) -> int` in its module.

Heavy imports happen inside the command, so `pairopt --help` is instant. Bad input surfaces as
`PairoptError` and is printed as one paragraph with exit code 2, never as a traceback.
"""

from __future__ import annotations

import importlib
import sys
import textwrap

# command -> (module with main(argv), one-line summary)
COMMANDS = {
    "train": (
        "pairopt.training.trainer",
        "train a model on preference pairs (pairopt train --loss dpo)",
    ),
    "losses": ("pairopt.loss.table", "list the registered losses, their parameters and needs"),
    "verify": ("pairopt.verify", "check that the shared forward is exact for a model"),
    "bench": ("pairopt.bench.cli", "benchmark shared vs unshared, padded vs packed, side by side"),
}

USAGE = "usage: pairopt COMMAND [options]   (pairopt COMMAND --help for a command's options)"


def _help() -> str:
    lines = [USAGE, "", "commands:"]
    lines += [f"  {name:<8} {summary}" for name, (_, summary) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_help())
        return 0
    if argv[0] == "--version":
        from pairopt import __version__

        print(f"pairopt {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"pairopt: unknown command {command!r}.\n\n{_help()}", file=sys.stderr)
        return 2
    from pairopt.errors import PairoptError

    try:
        module = importlib.import_module(COMMANDS[command][0])
        return int(module.main(rest) or 0)
    except PairoptError as err:
        message = (
            textwrap.fill(str(err), width=100, break_long_words=False, break_on_hyphens=False)
            if "\n" not in str(err)
            else str(err)
        )
        print(f"pairopt {command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pairopt {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""The registry of `segrec` subcommands and the error a user can fix.

Each command module (trainer/cli/*_command(s).py) registers its flags and its
run function with `@command(...)`; trainer/cli/main.py imports them all and
dispatches. Kept apart from main.py so command modules never import the
module that imports them.
"""

from __future__ import annotations

from typing import Callable


class UserError(Exception):
    """A mistake the user can fix; printed without a traceback, exit code 2."""


COMMANDS: dict = {}


def command(name: str, help: str, beam: bool = False):
    """Registers `add_args(parser)` and returns a decorator for `run(args, beam_args)`."""

    def register(add_args: Callable):
        def with_run(run: Callable):
            COMMANDS[name] = (help, add_args, run, beam)
            return run

        return with_run

    return register

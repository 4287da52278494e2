"""User-facing errors: the CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """A mistake in input (file, flag, config): message names the thing and what is wrong."""

"""User-facing errors: the CLI prints them as one line and exits with `exit_code`."""


class UserError(Exception):
    """A mistake in input (file, flag, config): message names the thing and what is wrong."""

    exit_code = 2


class RunFailed(UserError):
    """A run that failed in a way it understands (its restart budget spent, the same
    failure twice): one line saying what happened and where the details are; exit 1."""

    exit_code = 1

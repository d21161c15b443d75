"""User-facing errors: one sentence saying what was wrong and what to do; the CLI exits with 2."""


class UserError(Exception):
    """Bad input from a user (config, prompt file, model folder, option). Never a bug."""

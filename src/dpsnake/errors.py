"""Exceptions shared by all modules."""


class UserError(Exception):
    """Bad input (config key, file, frame): reported as one line naming what is wrong."""

"""Errors a user can fix: the CLI prints their message on one line, no traceback."""


class Gemma4Error(Exception):
    """A problem with the user's input (paths, checkpoints, configs, arguments)."""


class ConfigError(Gemma4Error):
    """config.json is missing, unreadable or describes a model we cannot run."""


class CheckpointError(Gemma4Error):
    """Weights are missing, corrupt or do not match the config."""

"""One exception type per kind of user error.

The CLI (``modelmake.cli``) prints these as ``modelmake: <message>`` and exits with code 2; any
other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Something the user can fix: bad config, bad input record, unreachable server."""


class ConfigError(UserError):
    """config.yaml does not match schemas/config.schema.yaml, or names a missing path."""


class RecordError(UserError):
    """A malformed input record, reported with file:line."""


class ServiceError(UserError):
    """A server or proxy did not become ready, died, or answers wrongly."""


class GenerationError(UserError):
    """Too many records of a generation input (a shard, prompts, a fraction) failed to generate."""

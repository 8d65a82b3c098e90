"""The errors raytl shows its user as one sentence and exit status 2 (anything else is a bug and keeps its
traceback). No heavy imports here: the CLI names them without loading torch or Ray."""


class ConfigError(ValueError):
    """A bad option value; the message is one sentence naming the option and what is allowed."""


class StorageError(ValueError):
    """A path or URI that cannot be used: missing, unreadable or not allowed."""


class WeightsError(ValueError):
    """Weights that cannot be used: unreadable, or not the shapes the model needs."""


class EmbeddingsError(ValueError):
    """An embeddings dataset that cannot be used as given (schema, dimensions, backbone)."""


class ExtractError(ValueError):
    """The run stopped on purpose (too many broken files); the message says why and what to do."""


class RayStartError(ValueError):
    """Ray could not be started or joined (after one retry); the message names the likely causes."""


# What `raytl` prints as one line; Ray re-raises a task's errors as RayTaskError subclasses of these.
USER_ERRORS = (ConfigError, StorageError, WeightsError, EmbeddingsError, ExtractError, RayStartError)

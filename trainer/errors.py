"""The config error every layer of a run raises (``normlab`` commands print it as one line and exit 2).

Its own module so that the data package's file rules (:mod:`trainer.data.files`) can raise it while
:mod:`trainer.config` imports them.
"""


class ConfigError(ValueError):
    """A configuration (or data path) mistake; ``str()`` is one line naming the key and the problem."""

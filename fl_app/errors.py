"""The error a user's bad configuration ends in: one message saying what is wrong and how to fix
it. Here, apart from `fl_app.config`, so that what config imports (the device check) can raise it
too without an import loop."""


class ConfigError(ValueError):
    """A run's configuration cannot be used; the message says what is wrong and how to fix it."""

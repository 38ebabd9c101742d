"""The base error of the library: every problem a user can fix raises a :class:`LocalSGDError`."""

__all__ = ["LocalSGDError"]


class LocalSGDError(Exception):
    """A model, transition, update, configuration, data set, checkpoint or run folder that
    LoCal+SGD cannot handle; the message says what is wrong and how to fix it.

    The passes raise it for untraceable models, models without conv/linear layers, transitions out
    of range and non-finite local updates; ``localsgd_fx`` derives its own errors from it
    (bad configuration values, missing or corrupt data, incompatible checkpoints, a run folder in
    use), so ``except LocalSGDError`` catches every one of them. Errors about argument values are
    also ``ValueError`` instances.
    """

"""The one error type the passes (and the library on top of them) raise for user-facing problems."""


class LocalSGDError(RuntimeError):
    """A model, transition or update that LoCal+SGD cannot handle, with the reason and the fix.

    Raised for untraceable models, models without conv/linear layers, transitions out of range,
    non-finite local updates and incompatible checkpoints.
    """

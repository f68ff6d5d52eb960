"""The error every loader raises for unusable input."""


class CheckpointError(ValueError):
    """A checkpoint, export or tokenizer that cannot be used; the message names the path."""

"""kvpred's user-facing error, in a module of its own so that the `kvpred` command can catch it before importing
torch or transformers."""


class KVPredError(ValueError):
    """A user-facing error: bad input, unsupported model or mismatched checkpoint. The message says what to do."""

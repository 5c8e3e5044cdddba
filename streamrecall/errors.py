"""The one base class every streamrecall exception derives from."""


class StreamrecallError(Exception):
    """Base of all errors raised by streamrecall."""


class ConfigError(StreamrecallError):
    """A setting has a wrong value; the message names the setting."""


class TransientError(StreamrecallError):
    """A failure that may pass (broker unreachable, disk full): retry with backoff, never dead-letter."""


class BrokerUnreachable(TransientError):
    """No broker answered within the bootstrap timeout; the message says what to check."""

"""mxgate: an outbound SMTP gateway that keeps a fleet inside each mailbox provider's limits."""

__version__ = "0.1.0"

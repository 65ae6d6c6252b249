"""egress layer."""

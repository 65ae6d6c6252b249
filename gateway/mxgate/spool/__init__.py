"""spool layer."""

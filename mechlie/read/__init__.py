"""mechlie.read."""

"""mechlie.core."""

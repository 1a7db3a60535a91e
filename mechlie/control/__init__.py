"""mechlie.control."""

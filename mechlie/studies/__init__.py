"""mechlie.studies."""

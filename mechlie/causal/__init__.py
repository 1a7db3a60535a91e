"""mechlie.causal."""

"""mechlie.sae."""

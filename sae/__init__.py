"""saeforge sae package."""

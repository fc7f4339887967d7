"""saeforge analysis package."""

"""Sample data for the example apps (data preparation only; agents never import this)."""

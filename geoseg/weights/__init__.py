"""Built-in model weights and cards (see `geoseg models`)."""

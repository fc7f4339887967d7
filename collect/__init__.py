"""Collection: model loading, layer discovery, hooks, corpus, the Zarr activation store, the collector."""

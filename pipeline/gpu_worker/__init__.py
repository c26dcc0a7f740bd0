"""Role: one pinned worker per GPU (model LRU, audio features, UNet)."""

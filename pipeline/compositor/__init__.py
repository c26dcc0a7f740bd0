"""Role: the compositor pool (paste mouth crops onto backgrounds, JPEG)."""

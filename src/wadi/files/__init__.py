"""Files: writing whole-or-nothing, weights without code, the hub, images, locks, prompts."""

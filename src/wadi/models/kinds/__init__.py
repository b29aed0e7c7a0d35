"""The backbone kinds that need more than a few lines of their own: one module each, holding
the functions its registry entry (wadi.models.registry.KINDS) names."""

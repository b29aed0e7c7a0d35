"""Backbone kinds whose encode, call, guidance and schedule each live in a module of their own."""

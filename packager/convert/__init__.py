"""Converters from a resolved source to a bundle format."""

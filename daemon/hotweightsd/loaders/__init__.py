"""Loaders: read a rank's files into resident memory (plans, files, the bounce ring, the native engine, GDS)."""

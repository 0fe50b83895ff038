"""Surviving a restart: the service manager protocol, the fd store, the state file."""

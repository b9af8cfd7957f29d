"""Coordinator: the ServerApp, strategy selection, site handshake, run directory and metrics."""

"""Model definitions with their losses and metrics, shared by coordinator and sites.

Imports nothing from ``server`` or ``client``: both sides build the same model from its name.
"""

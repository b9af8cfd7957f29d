"""Coordinator operations: kits and TLS, the SuperLink, public pretraining, following a run."""

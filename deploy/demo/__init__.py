"""Federations on one machine: a loopback consortium of real processes, and an in-process transport."""

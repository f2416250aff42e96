"""Test helpers that start real processes (redis-server) or stand in at a process boundary."""

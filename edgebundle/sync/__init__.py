"""Sync: one conversation in Redis, continued from any device (see service.SyncService)."""

"""Data: reading task files, tokenizing with suffix masks, batching, and DataModules."""

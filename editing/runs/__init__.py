"""The runs layer: what a run writes and how it is read back.

Typed results records (``records``), run folders and their claims (``run_folder``), metrics logs, checkpoints, the
console's lines and tables, and the edit folder's integrity manifest (``manifest``).
"""

"""The protocol layer: the paper's protocol over many fits.

Search spaces, optuna storage, the trial runner, the sweep, selection on validation, test runs over seeds, the
report, ``auto`` (the whole protocol for a user's examples) and the ensemble's beta search.
"""

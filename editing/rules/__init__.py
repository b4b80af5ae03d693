"""The rules layer: SPEC's rules as plain functions, no model and no I/O.

The degradation budget and its balls (``budget``, SPEC section 6), task definitions (``tasks``) and training losses
(``losses``).
"""

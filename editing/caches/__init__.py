"""The caches layer: how every cache stores an entry and builds its key, and what ``editing cache`` lists.

``entries`` is the one checked reader and writer of cached tensors (material and content hash verified on read),
``keys`` the key parts shared by every cache (numerics, model config, code digest, tokenizer), ``contents`` the
folders ``editing cache list/clear`` know. The caches themselves live beside the computation they store (p0 in
``editing.evaluation.caching``, MEMIT statistics in ``editing.methods.memit.covariance``, ...); each key's coverage
is written beside it and in docs/architecture.md.
"""

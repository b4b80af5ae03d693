"""The core layer: leaves that import nothing else of the package.

Errors, typed names, paths, atomic file writes, checked text reading, content hashes (``digests``), the signal stop
(``interruption``) and the table of moved import paths (``moved``). Any module may import from here.
"""

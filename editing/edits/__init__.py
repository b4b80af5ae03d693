"""The edits layer: saved edits loaded onto their base model (``load``) and combined (``combine``).

``from editing.edits import load_edited`` (and the other names of the old ``editing.edits`` module) still works for
one release, with a FutureWarning naming the new path (``from editing.edits.load import load_edited``, or
``from editing import load_edited``).
"""

from editing.core.moved import split_attribute

__getattr__ = split_attribute(__name__, ("editing.edits.load",))

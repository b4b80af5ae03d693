"""Full finetuning: every weight is trainable; p0 is a frozen copy."""

from editing.core.types import MethodName
from editing.methods.full.edit import write_full_edit
from editing.methods.full.module import FullEditor
from editing.methods.registry import MethodSpec, register
from editing.methods.tensor_edit import TENSORS_KIND, load_tensor_edit, merge_tensor_edit

register(MethodSpec(MethodName.FULL, FullEditor, config=None, edit_kind=TENSORS_KIND, write_edit=write_full_edit,
                    load_edit=load_tensor_edit, merge_edit=merge_tensor_edit))


class FullFinetune(FullEditor):
    """The former name of ``FullEditor`` (the same method); configs and ``--model FullFinetune`` may still name it.

    A subclass rather than a second name bound to the class, so that the command line finds it by its short name.
    """


__all__ = ["FullEditor", "FullFinetune"]

"""AlphaEdit: MEMIT with each layer's update confined to the null space of the general corpus's keys (SPEC section
12); a member of the MEMIT family (``editing.methods.memit``), whose parts it reuses."""

from editing.methods.alphaedit.config import AlphaEditConfig
from editing.methods.alphaedit.edit import write_alphaedit_edit
from editing.methods.alphaedit.module import AlphaEditEditor
from editing.methods.registry import MethodSpec, register
from editing.methods.tensor_edit import TENSORS_KIND, load_tensor_edit, merge_tensor_edit

# the edit's weights are W + Delta W, a changed-tensors edit like MEMIT's (its extra keys file rides along)
register(MethodSpec("alphaedit", AlphaEditEditor, AlphaEditConfig, edit_kind=TENSORS_KIND,
                    write_edit=write_alphaedit_edit, load_edit=load_tensor_edit, merge_edit=merge_tensor_edit))

__all__ = ["AlphaEditConfig", "AlphaEditEditor"]

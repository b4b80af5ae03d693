"""MEMIT: closed-form edits of the MLP down projections, with cached covariance statistics (SPEC section 10)."""

from editing.core.types import MethodName
from editing.methods.memit.config import MEMITConfig
from editing.methods.memit.edit import write_memit_edit
from editing.methods.memit.module import MEMITEditor
from editing.methods.registry import MethodSpec, register
from editing.methods.tensor_edit import TENSORS_KIND, load_tensor_edit, merge_tensor_edit

register(MethodSpec(MethodName.MEMIT, MEMITEditor, MEMITConfig, edit_kind=TENSORS_KIND, write_edit=write_memit_edit,
                    load_edit=load_tensor_edit, merge_edit=merge_tensor_edit))

__all__ = ["MEMITConfig", "MEMITEditor"]

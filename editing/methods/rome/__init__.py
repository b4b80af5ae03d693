"""ROME: one rank-one closed-form edit of one layer's MLP down projection per request, requests one after another
(SPEC section 11); a member of the MEMIT family (``editing.methods.memit``), whose parts it reuses."""

from editing.methods.memit.edit import write_memit_edit
from editing.methods.registry import MethodSpec, register
from editing.methods.rome.config import ROMEConfig
from editing.methods.rome.module import ROMEEditor
from editing.methods.tensor_edit import TENSORS_KIND, load_tensor_edit, merge_tensor_edit

# the edit is W + Delta W of the edited projection, a changed-tensors edit like MEMIT's
register(MethodSpec("rome", ROMEEditor, ROMEConfig, edit_kind=TENSORS_KIND, write_edit=write_memit_edit,
                    load_edit=load_tensor_edit, merge_edit=merge_tensor_edit))

__all__ = ["ROMEConfig", "ROMEEditor"]

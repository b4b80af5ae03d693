"""GRACE: a codebook adapter at one layer's MLP down projection (SPEC section 13; Hartvigsen et al. 2023). Its edit
is the codebook (kind ``grace_codebook``), consulted at run time: not a weight change, so it is never merged."""

from editing.methods.grace.codebook import Codebook
from editing.methods.grace.config import GRACEConfig
from editing.methods.grace.edit import GRACE_KIND, load_grace_edit, write_grace_edit
from editing.methods.grace.module import GRACEEditor
from editing.methods.registry import MethodSpec, register

# merge_edit None: `editing export --merged` refuses it (a plain transformers model cannot carry a codebook)
register(MethodSpec("grace", GRACEEditor, GRACEConfig, edit_kind=GRACE_KIND, write_edit=write_grace_edit,
                    load_edit=load_grace_edit, merge_edit=None))

__all__ = ["Codebook", "GRACEConfig", "GRACEEditor"]

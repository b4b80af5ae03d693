"""Native Backpack language models, registered with transformers' Auto classes on import."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from editing.models.backpack.configuration import BACKPACK_MODEL_TYPE, BackpackConfig, is_backpack_config
from editing.models.backpack.modeling import BackpackLMHeadModel, BackpackModel, BackpackOutput

AutoConfig.register(BACKPACK_MODEL_TYPE, BackpackConfig, exist_ok=True)
AutoModel.register(BackpackConfig, BackpackModel, exist_ok=True)
AutoModelForCausalLM.register(BackpackConfig, BackpackLMHeadModel, exist_ok=True)

__all__ = ["BACKPACK_MODEL_TYPE", "BackpackConfig", "BackpackLMHeadModel", "BackpackModel", "BackpackOutput",
           "is_backpack_config"]

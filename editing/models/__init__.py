"""Model loading: hub ids, local folders, GGUF files, the embedded default, and tiny random configs."""

from editing.models.loading import LoadedModel, ModelConfig, load_model

__all__ = ["LoadedModel", "ModelConfig", "load_model"]

"""canonical-editing: edit language models from canonical examples (Hewitt et al., 2024)."""

__version__ = "0.1.0"

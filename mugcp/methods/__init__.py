"""Prompt-learning methods, registered by name (see ``registry``)."""
from mugcp.methods.base import PromptLearner
from mugcp.methods.registry import (
    create_model,
    get_method,
    list_methods,
    list_variants,
    register_method,
    resolve_options,
)

__all__ = ["PromptLearner", "create_model", "get_method", "list_methods", "list_variants", "register_method",
           "resolve_options"]

"""MuGCP: fast prompt learning for frozen CLIP models.

    import mugcp
    model = mugcp.create_model("coop", ["cat", "dog"], backbone="ViT-B-32", pretrained="none")
    logits = model(images)            # (B, 2)
"""
from mugcp.backbones import get_tokenizer, load_clip
from mugcp.methods import create_model, get_method, list_methods

__version__ = "0.1.0"
__all__ = ["create_model", "get_method", "get_tokenizer", "list_methods", "load_clip", "__version__"]

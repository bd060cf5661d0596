"""MuGCP: fast prompt learning for frozen CLIP models.

    import mugcp
    model = mugcp.create_model("coop", ["cat", "dog"], backbone="ViT-B-32", pretrained="none")
    logits = model(images)            # (B, 2): images a (B, 3, 224, 224) batch of preprocessed images

    model, preprocess = mugcp.load_run("runs/my_run", classnames=["cat", "dog"])   # a trained run
    model.predict([PIL.Image.open("cat.jpg")])                                      # top-k classes
"""
from mugcp.backbones import get_tokenizer, load_clip
from mugcp.methods import create_model, get_method, list_methods

__version__ = "0.1.0"
__all__ = ["create_model", "get_method", "get_tokenizer", "list_methods", "load_clip", "load_run", "__version__"]


def load_run(run, classnames=None, device="cpu", semantic_cache=None, mllm=None):
    """``model, preprocess = mugcp.load_run(RUN, classnames=[...])``; see :func:`mugcp.predict.load_run`."""
    from mugcp.predict import load_run as _load_run

    return _load_run(run, classnames=classnames, device=device, semantic_cache=semantic_cache, mllm=mllm)

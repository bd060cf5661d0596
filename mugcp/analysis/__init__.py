"""What a run learned, as numbers and figures: predictions, per-class results, confusion, training
curves, nearest words of the learned context, MuGCP's AMG maps and MPF gates.

Layering: ``figures``, ``predictions``, ``confusion``, ``curves`` and ``per_class`` use only numpy,
torch, matplotlib and ``mugcp.utils``, so the engine (evaluation, trainer) and the report may call
them. ``nearest_words`` and ``amg`` read a built method; ``inspection`` sits on top (it loads a run
with ``mugcp.load_run``) and is what ``python -m mugcp.inspect`` calls. Nothing is imported here
eagerly, so importing one module never pulls in the layers above it.
"""

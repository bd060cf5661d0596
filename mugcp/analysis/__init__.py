"""What a run learned, as numbers and figures: predictions, per-class results, confusion, training
curves, nearest words of the learned context, MuGCP's AMG maps and MPF gates.

Layering: beside methods and semantics. ``figures``, ``predictions``, ``confusion``, ``curves`` and
``per_class`` use only numpy, torch, matplotlib and ``mugcp.utils``, so the engine (evaluation,
trainer) and the reports may call them; ``nearest_words`` and ``amg`` read a built method. Inspecting
a trained run (``python -m mugcp.inspect``) loads it through the engine, so it lives above it, in
:mod:`mugcp.inference.inspection`. Nothing is imported here eagerly.
"""

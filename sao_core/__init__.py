"""SAO: a model aligns itself with preference data it writes, answers and judges itself.

The library: config, row types, stages, engines, storage, training. No Prefect here; heavy imports
(torch, transformers, datasets) stay inside the functions that need them so `import sao_core` is fast.
"""

__version__ = "0.1.0"

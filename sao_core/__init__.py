"""SAO: a model aligns itself with preference data it writes, answers and judges itself.

The library, one package per concern (README, "Layout"); no Prefect here, and heavy imports (torch,
transformers, datasets) stay inside the functions that need them so `import sao_core` is fast.

config      the round's config: schema, sections, validation, overrides
method      the paper's steps as pure functions: personas, prompts, responses, judging, pairing,
            decontamination, the quality rule
store       the artifact store: files, shards and manifests, leases, round layout and hashes, models
engines     chat requests in, completions out (fake, transformers, vLLM, OpenAI-compatible servers)
stages      a step run over the store: the shard runner, the stages, `python -m sao_core.stages`
training    preference optimisation on the pairs (SimPO, DPO, ORPO) and its rank entry point
evaluation  the trained policy against the current and original models: win rate, judge trust, lm-eval
campaign    promotion rule, promotion ledger, next-round planning, round and campaign reports, lineage
"""

__version__ = "0.1.0"

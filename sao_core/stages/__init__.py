"""A step of the method run over the artifact store: personas -> prompts -> responses -> judgements -> pairs.

runner           the shard runner of the model stages (prompts, responses, judgements) and stage manifests
no_model         the stages that call no model: personas and pairs
persona_sources  a round's personas from the builtin generator, a file or a Hugging Face dataset
synth            the data stages in order, without Prefect (`sao synth`)
command          one shard as a command: `python -m sao_core.stages <stage> --round URL --shard N`
"""

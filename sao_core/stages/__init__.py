"""The SAO data stages over the artifact store: personas -> prompts -> responses -> judgements -> pairs.

layout   round folder, stage folders, shard counts, what a stage's output depends on (settings hash)
round    the stages that call no model: personas and pairs
runner   the shard runner of the model stages (prompts, responses, judgements) and stage manifests
child    one shard in a child process under the vLLM environment's interpreter
cli      one shard as a command: `python -m sao_core.stages.<stage> --round URL --shard N`
train    one training rank as a command (what accelerate and torchrun start)
"""

"""The paper's method as pure functions: no store, no engine, no Prefect (SAO.md).

personas       persona ids, the builtin persona generator and drawing a sample from a pool
prompts        the persona-to-prompt template, its requests and the parser of what the model wrote
responses      two answers per prompt: requests and selection
judging        the pairwise judge template, verdict parser and the choice of chosen and rejected
pairing        preference pairs from the judgements
decontaminate  n-gram overlap of prompts with the evaluation set
quality        the quality gate a round's data must pass before training
"""

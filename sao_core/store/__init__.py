"""The artifact store: where everything a round reads and writes lives, and how it is checked.

storage  files at fsspec URLs: atomic writes, bounded retries of transient errors, exclusive create
shards   rows, shards and manifests: how a stage's output is written, verified and read back
locks    leases (shard, stage and training claims, the campaign lock) kept in the store itself
layout   a round's folder and its stage folders, the hashes that name them, its resolved config
models   model and adapter references: bundled, hub ids, local folders, URLs fetched into the cache
trained  finished training runs found and checked, and the content key of their weights
evalsets the evaluation instructions and labelled judge-trust pairs (bundled or files), strictly loaded;
         the prompts stage reads them too, to drop prompts that overlap them
"""

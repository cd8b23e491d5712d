"""Errors raised by sao_core, each naming what is wrong (the key, file, model path or row)."""


class SAOError(Exception):
    """Base class for every error this project raises on purpose."""


class ConfigError(SAOError, ValueError):
    """A config file, key or value is wrong."""


class StorageError(SAOError):
    """A file in the artifact store is missing, unreadable or not what its manifest says."""


class ManifestError(StorageError):
    """A shard does not match its manifest entry (hash, row count) or the manifest is malformed."""


class PersonaSourceError(SAOError, ValueError):
    """A persona source cannot give the personas asked for."""


class ModelNotFoundError(SAOError, FileNotFoundError):
    """A model reference resolves to nothing usable."""


class EngineError(SAOError):
    """An engine failed to produce completions for a shard."""


class RoundQualityError(SAOError):
    """A round's data is below the quality gate (too few pairs, too few judgements that give a pair)."""


class TrainingError(SAOError):
    """Training cannot start (bad pairs, settings, output) or a training process failed."""


class FanoutError(SAOError):
    """Shards sent to other workers are still missing after every allowed attempt."""


class StorageConflict(StorageError):
    """A create-only write found the object already there: another writer got it first."""


class CampaignError(SAOError, ValueError):
    """A promotion or rollback that the campaign's history or the model does not allow."""


class TransientStorageError(SAOError, ConnectionError):
    """The artifact store did not answer after every try (refused or cut connections, 5xx answers).

    Deliberately not a StorageError: tasks.cache.retry_unless_permanent treats StorageError as permanent,
    and this one may pass on a later try. A ConnectionError, so code that expects I/O errors from the
    store (OSError) still catches it.
    """


class LeaseLost(SAOError):
    """A lease was taken over while its holder still worked under it (the holder froze past its ttl):
    what the holder made is not written; a retry finds the other holder's result or waits for it."""


class LeaseTimeout(StorageConflict):
    """A lease stayed held by another live holder for longer than the caller would wait."""

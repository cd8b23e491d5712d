"""The round config's schema: one frozen section per stage, validated when built (STYLE.md rule 2).

Also the model and data references a config holds and the URL schemes each one uses, checked against
run.allowed_schemes (SECURITY.md).
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from sao_core.config.schemes import (
    BASE_URL_SCHEMES,
    DEFAULT_SCHEMES,
    SCHEME_ALIASES,
    RefKind,
    check_base_url,
    url_schemes,
)
from sao_core.config.worker_env import LM_EVAL_INCLUDE_VAR, key_env_problem, lm_eval_includes_allowed
from sao_core.redact import redact, url_credentials


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RunConfig(Section):
    """Where the round lives and how its data is laid out."""

    campaign: str = Field("default", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    round: int = Field(1, ge=1)
    seed: int = 0
    root: str = Field(
        "artifacts", min_length=1
    )  # any fsspec URL: a local folder, s3://bucket/prefix, memory://...
    format: Literal["jsonl", "parquet"] = "jsonl"
    shard_size: int = Field(256, ge=1)
    # What model.path, model.adapter, personas.path, evaluation.prompts/trust/original, run.root and the
    # training files may name, checked when the config loads (url_schemes).
    allowed_schemes: tuple[str, ...] = Field(DEFAULT_SCHEMES, min_length=1)

    @field_validator("allowed_schemes")
    @classmethod
    def _scheme_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        bad = [s for s in value if not re.fullmatch(r"[a-z][a-z0-9+.-]*", s)]
        if bad:
            raise ValueError(
                f"run.allowed_schemes holds {bad}: schemes are lowercase names such as s3, file, hf"
            )
        return tuple(dict.fromkeys(SCHEME_ALIASES.get(s, s) for s in value))

    # What engine.base_urls (in every engine section) may use; kept apart from allowed_schemes so that
    # allowing a server over http does not let model.path or the persona file come over http too.
    allowed_base_url_schemes: tuple[Literal["http", "https"], ...] = Field(BASE_URL_SCHEMES, min_length=1)


class ModelConfig(Section):
    # A Hugging Face id, a local folder, or bundled:smollm2-135m-instruct (sao_core.store.models).
    path: str = Field("bundled:smollm2-135m-instruct", min_length=1)
    revision: str | None = None
    # A LoRA adapter folder (any fsspec URL) applied on top of `path`: a trained round's policy.
    adapter: str | None = Field(None, min_length=1)
    # Run Python code that ships with the model (its auto_map) when it loads. transformers and vLLM get
    # it explicitly; off, a model that needs its own code fails to load instead of running it (SECURITY.md).
    trust_remote_code: bool = False


class FakeEngineConfig(Section):
    """Knobs of the scripted engine, for exercising the failure paths."""

    malformed_judge_rate: float = Field(0.0, ge=0.0, le=1.0)
    # Share of verdicts given by position ("1 > 2") instead of by content (the longer answer wins).
    position_bias: float = Field(0.0, ge=0.0, le=1.0)
    missing_prefix_rate: float = Field(0.0, ge=0.0, le=1.0)
    duplicate_prompt_rate: float = Field(0.0, ge=0.0, le=1.0)
    truncate_rate: float = Field(0.0, ge=0.0, le=1.0)
    identical_response_rate: float = Field(0.0, ge=0.0, le=1.0)
    # The first `fail_calls` generate calls of each engine object raise EngineError (retry tests).
    fail_calls: int = Field(0, ge=0)


class EngineConfig(Section):
    name: Literal["transformers", "fake", "vllm", "openai"] = "transformers"
    batch_size: int = Field(16, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # vllm: the interpreter of the environment that has vLLM (None: the current one).
    python: str | None = None
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0)
    tensor_parallel_size: int = Field(1, ge=1)
    max_model_len: int | None = Field(None, ge=16)
    enforce_eager: bool = False
    # openai: replicas of an OpenAI-compatible server; the key is read from this environment variable,
    # which must be one the worker's environment allows (sao_core.config.worker_env: *_API_KEY unless
    # SAO_ALLOWED_KEY_ENVS says otherwise), so a config cannot send any other secret to its base_urls.
    base_urls: tuple[str, ...] = ()
    api_key_env: str = "OPENAI_API_KEY"
    # The model name the servers know (`vllm serve --served-model-name`); None: model.path.
    served_model_name: str | None = None
    # The name they serve model.adapter under (`vllm serve --enable-lora --lora-modules NAME=FOLDER`):
    # the base and its adapter answer under their own names from one engine section.
    served_adapter_name: str | None = None
    max_concurrency: int = Field(8, ge=1)
    request_timeout_s: float = Field(120.0, gt=0)
    max_retries: int = Field(4, ge=0)
    # Wall-clock limit of one shard of a model stage under the orchestrator (the Prefect task timeout).
    shard_timeout_s: float = Field(6 * 3600.0, gt=0)
    fake: FakeEngineConfig = FakeEngineConfig()

    @field_validator("api_key_env")
    @classmethod
    def _key_env_allowed(cls, value: str, info: ValidationInfo) -> str:
        # Only where a key is sent: an operator who allows no key at all can still run local engines.
        problem = key_env_problem(value) if info.data.get("name") == "openai" else None
        if problem:
            raise ValueError(problem)
        return value


class PersonasConfig(Section):
    source: Literal["builtin", "file", "hf"] = "builtin"
    n: int = Field(32, ge=1)
    path: str | None = Field(None, min_length=1)  # file: JSONL/Parquet/CSV by URL
    column: str = Field("persona", min_length=1)
    dataset: str | None = Field(None, min_length=1)  # hf: a dataset id such as proj-persona/PersonaHub
    subset: str | None = None
    split: str = "train"
    exclude_used: bool = True  # skip personas sampled by earlier rounds of the same campaign

    @model_validator(mode="after")
    def _source_fields(self) -> PersonasConfig:
        if self.source == "file" and not self.path:
            raise ValueError("personas.source 'file' needs personas.path (a JSONL, Parquet or CSV URL)")
        if self.source == "hf" and not self.dataset:
            raise ValueError("personas.source 'hf' needs personas.dataset (e.g. proj-persona/PersonaHub)")
        return self


class PromptsConfig(Section):
    # SAO.md step 2: temperature 0.6, top_p 0.95 as in Persona Hub's script.
    temperature: float = Field(0.6, ge=0.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    max_tokens: int = Field(256, ge=1)
    # Our addition, off in the paper recipes: start the model's answer with this text (it must begin
    # with "User prompt:"). Very small models mostly repeat the template back; a prefill such as
    # "User prompt: As a" makes them write a persona-grounded request instead.
    prefill: str | None = Field(None, pattern=r"^User prompt:")


class ResponsesConfig(Section):
    k: int = Field(2, ge=2)
    temperature: float = Field(0.6, ge=0.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    max_tokens: int = Field(512, ge=1)


class JudgingConfig(Section):
    # The paper gives no judge temperature; greedy keeps verdicts reproducible.
    temperature: float = Field(0.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(32, ge=4)
    swap: bool = False  # judge both orders, keep only order-consistent verdicts (not in the paper)
    # Our addition, off in the paper recipes: start the judge's answer with this text (it must begin
    # with "ranking:"). Very small models rarely produce the format unprompted (SmolLM2-135M: none of
    # 14 verdicts parsed); the parse rate and position bias in the diagnostics show what it costs.
    prefill: str | None = Field(None, pattern=r"^ranking:")
    # Our addition, off in the paper recipes: also accept a bare "ranking: X" as X first.
    lenient: bool = False
    # Quality gate on the valid rate: the share of judgements that give a pair (with judging.swap both
    # orders must agree).
    min_valid_rate: float = Field(0.5, ge=0.0, le=1.0)


class PairingConfig(Section):
    min_pairs: int = Field(1, ge=0)  # quality gate: fewer surviving pairs fail the round


class LoraSection(Section):
    """LoRA through PEFT; `enabled: false` trains every weight (the paper's full fine-tune)."""

    enabled: bool = True
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    # Module names, or ("all-linear",) for PEFT's every-linear-layer shortcut.
    target_modules: tuple[str, ...] = Field(("q_proj", "k_proj", "v_proj", "o_proj"), min_length=1)


class TrainingConfig(Section):
    """Preference optimisation (SAO.md step 6); sao_core.training turns it into TRL's config."""

    objective: Literal["simpo", "dpo", "orpo"] = "simpo"
    # SimPO (the paper's default): beta 10, gamma 3, gamma/beta = 0.3.
    beta: float = Field(10.0, gt=0.0)
    simpo_gamma: float = Field(3.0, ge=0.0)
    # DPO's beta: 0.01 per SimPO's notes for instruct models (beta 10 would be SimPO's scale, not DPO's).
    dpo_beta: float = Field(0.01, gt=0.0)
    # ORPO's lambda, the weight of the odds-ratio term (TRL's and the ORPO paper's 0.1).
    orpo_beta: float = Field(0.1, gt=0.0)
    learning_rate: float = Field(1e-6, gt=0.0)
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    epochs: float = Field(1.0, gt=0.0)
    max_steps: int = Field(-1, ge=-1)  # > 0 stops there, whatever `epochs` says
    # global batch = per_device_batch_size x gradient accumulation x processes; accumulation is derived.
    global_batch_size: int = Field(128, ge=1)
    per_device_batch_size: int = Field(2, ge=1)
    max_length: int = Field(2048, ge=8)  # prompt + answer tokens; longer pairs are dropped and counted
    max_prompt_length: int = Field(1800, ge=4)
    # Weights stay fp32 and bf16/fp16 run as autocast, so AdamW updates at lr 1e-6 are not lost to
    # bf16 rounding (DeepSpeed keeps its own fp32 master weights).
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    gradient_checkpointing: bool = False
    lora: LoraSection = LoraSection()
    merge: bool = False  # LoRA: also write the merged full model next to the adapter
    launcher: Literal["inprocess", "accelerate", "torchrun"] = "inprocess"
    num_processes: int = Field(1, ge=1)
    accelerate_config: str | None = None  # deployments/accelerate/*.yaml; None: ddp.yaml
    deepspeed: str | None = None  # a DeepSpeed JSON, e.g. deployments/deepspeed/zero3.json
    checkpoint_steps: int = Field(50, ge=1)
    save_total_limit: int = Field(2, ge=1)  # checkpoints kept while training
    keep_checkpoints: bool = False  # keep them once the final model is written
    seed: int = 0
    logging_steps: int = Field(1, ge=1)
    # TRL's own reporting of every logged step, written under the run's output ({model}/logs): e.g.
    # [tensorboard], [mlflow], [wandb] (their package installed, their settings from the environment).
    # Empty or [none]: none; the run's train_log.json and train_curves.png are written either way.
    report_to: tuple[Literal["none", "tensorboard", "mlflow", "wandb"], ...] = ()
    # A Prefect deployment ("flow/deployment", e.g. sao-train/train from prefect.yaml) on a multi-GPU
    # pool: the round's train task runs training there and waits. None: train where the round runs.
    deployment: str | None = Field(None, pattern=r"^[^/]+/[^/]+$")

    @model_validator(mode="after")
    def _consistent(self) -> TrainingConfig:
        if self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"training.max_prompt_length ({self.max_prompt_length}) must be below "
                f"training.max_length ({self.max_length})"
            )
        if self.launcher == "inprocess" and self.num_processes != 1:
            raise ValueError(
                f"training.launcher 'inprocess' runs one process, got num_processes={self.num_processes}; "
                "use launcher 'accelerate' or 'torchrun'"
            )
        if "none" in self.report_to and len(self.report_to) > 1:
            raise ValueError(
                f"training.report_to {list(self.report_to)} names 'none' beside a reporter: give the "
                "reporters, or [none]"
            )
        per_step = self.per_device_batch_size * self.num_processes
        if self.global_batch_size % per_step:
            raise ValueError(
                f"training.global_batch_size ({self.global_batch_size}) must be a multiple of "
                f"per_device_batch_size x num_processes ({self.per_device_batch_size} x {self.num_processes} = {per_step})"
            )
        return self


class JudgeConfig(Section):
    """The evaluation's judge. Unset: the campaign's current model on the round's engine, with the paper's
    judge template; set `model` (and `engine`) to judge with a stronger served model, as AlpacaEval does."""

    model: ModelConfig | None = None
    engine: EngineConfig | None = None


class DownstreamConfig(Section):
    """lm-eval tasks run on the candidate and on the current model (sao_core.evaluation.downstream); the promotion
    rule's `max_downstream_drop` says how far a task may fall."""

    enabled: bool = True
    # Bundled tasks (sao_core/data/lm_eval_tasks), task YAMLs under include_path, or lm-eval's own
    # (their data must already be cached: nothing is downloaded at run time).
    tasks: tuple[str, ...] = Field(("sao_arith", "sao_capitals"), min_length=1)
    # A local folder, checked against run.allowed_schemes; lm-eval task files can load Python
    # (`!function`), so it is refused unless the worker's environment has SAO_ALLOW_LM_EVAL_INCLUDE=1.
    include_path: str | None = Field(None, min_length=1)
    limit: int | None = Field(None, ge=1)  # questions per task; None: all
    num_fewshot: int | None = Field(None, ge=0)  # None: each task's own
    batch_size: int = Field(8, ge=1)

    @field_validator("include_path")
    @classmethod
    def _includes_allowed(cls, value: str | None) -> str | None:
        if value is not None and not lm_eval_includes_allowed():
            raise ValueError(
                "lm-eval task files can run Python (!function), so task folders of a config's choosing are "
                f"off unless the worker's operator sets {LM_EVAL_INCLUDE_VAR}=1 in its environment; drop "
                "evaluation.downstream.include_path or ask the operator"
            )
        return value


class EvaluationConfig(Section):
    """The trained policy against the campaign's current model (and from round 2 the original), judged in
    both orders; the judge rated on a labelled trust set (sao_core.evaluation.compare)."""

    # "builtin" (130 instructions written for this project, sao_core/data/eval/instructions.jsonl), a
    # JSONL URL of {id, instruction, category}, or hf:DATASET[:SUBSET] (its "eval" split's "instruction"
    # column, e.g. hf:tatsu-lab/alpaca_eval for AlpacaEval 2.0's 805 on a machine with network).
    prompts: str = Field("builtin", min_length=1)
    n: int | None = Field(None, ge=1)  # the first n instructions; None: all of them
    # Instructions (and judge cases) per evaluation shard; None: run.shard_size. It sets how many shard
    # tasks the evaluation fans out to. Every request keeps its id whatever the shard, so an engine that
    # answers each request on its own (the fake one; greedy decoding, up to batched rounding) gives the
    # same answers and verdicts at any size.
    shard_size: int | None = Field(None, ge=1)
    max_tokens: int = Field(128, ge=1)
    temperature: float = Field(0.0, ge=0.0)
    judge_max_tokens: int = Field(16, ge=4)
    # The judge-trust set: "builtin" (75 labelled pairs, one answer clearly better) or a JSONL URL.
    trust: str = Field("builtin", min_length=1)
    trust_n: int | None = Field(None, ge=1)
    bootstrap: int = Field(2000, ge=100)  # resamples of the win rate's interval
    # Word n-grams shared with the evaluation set drop a synthetic prompt (0: no decontamination).
    decontamination_n: int = Field(13, ge=0)
    judge: JudgeConfig = JudgeConfig()
    # The engine that loads the trained policy and the original model (None: the round's engine). On a
    # served engine (openai) a LoRA policy is loaded into the running `vllm serve` replicas at run time
    # (--enable-lora, VLLM_ALLOW_RUNTIME_LORA_UPDATING=True) and unloaded after; a full fine-tune needs an
    # engine that loads models (vllm, transformers).
    engine: EngineConfig | None = None
    downstream: DownstreamConfig = DownstreamConfig()
    # The campaign's first model, a second baseline from round 2 on (the campaign flow sets it).
    original: str | None = Field(None, min_length=1)
    enabled: bool = True


class PromotionConfig(Section):
    """When a round's model becomes the campaign's current one (sao_core.campaign.promotion)."""

    enabled: bool = True
    min_win_rate_lower: float = Field(0.5, ge=0.0, le=1.0)  # the win rate interval's lower bound must pass it
    min_judge_agreement: float = Field(0.6, ge=0.0, le=1.0)
    # Evidence before any rate is read: prompts the judge gave a verdict on in both orders, and the share of
    # all verdicts (evaluation and trust set) that parsed. Below either the round is "not enough evidence".
    min_judged: int = Field(20, ge=1)
    min_valid_share: float = Field(0.8, ge=0.0, le=1.0)
    # Points any downstream metric may fall (a drop of exactly this passes); 5 is one question of the
    # bundled 20-question tasks.
    max_downstream_drop: float = Field(5.0, ge=0.0)
    approval: Literal["auto", "human"] = "auto"  # human: the flow pauses for an answer in the Prefect UI
    approval_timeout_s: float = Field(24 * 3600.0, gt=0)  # no answer by then: rejected


class CampaignConfig(Section):
    """How a campaign carries on without a person (sao_core.campaign.planning)."""

    # A round that fails for good is recorded and the next one draws new personas and a new seed; after
    # this many failed rounds in a row the campaign pauses until a person resumes it.
    max_consecutive_failures: int = Field(3, ge=1)


class FanoutConfig(Section):
    """Where the shards of the model stages (prompts, responses, judgements) run.

    local: as tasks in the round's own process, one after another, on one loaded engine (the default).
    deployment: one flow run of `deployment` per GPU worker (`workers` of them), each given a list of
        shard indices and holding one engine for all of them (flows/gpu_batch.py); a batch whose run
        ends Crashed, Failed or past `batch_timeout_s` is resubmitted, at most `max_attempts` times.
        A prompts batch takes its shards through the whole data path (prompts, responses, judgements),
        so `batch_timeout_s` bounds all three.
    replicas: the openai engine over `engine.base_urls`; the stage's shards run as concurrent tasks,
        `concurrency` at once (0: one per replica), so every replica stays busy.
    """

    mode: Literal["local", "deployment", "replicas"] = "local"
    deployment: str = Field("sao-gpu-batch/gpu-batch", pattern=r"^[^/]+/[^/]+$")
    workers: int = Field(1, ge=1)
    max_attempts: int = Field(3, ge=1)
    batch_timeout_s: float = Field(6 * 3600.0, gt=0)
    poll_interval_s: float = Field(5.0, gt=0)
    # Polls may keep failing this long (the Prefect API or the store not answering) before the stage
    # gives up: a server restart is ridden out, an outage fails the stage (its task retry starts over
    # from the manifests).
    outage_s: float = Field(120.0, gt=0)
    concurrency: int = Field(0, ge=0)


class RoundConfig(Section):
    """Everything one SAO round needs; each stage reads only its own section."""

    run: RunConfig = RunConfig()
    model: ModelConfig = ModelConfig()
    engine: EngineConfig = EngineConfig()
    personas: PersonasConfig = PersonasConfig()
    prompts: PromptsConfig = PromptsConfig()
    responses: ResponsesConfig = ResponsesConfig()
    judging: JudgingConfig = JudgingConfig()
    pairing: PairingConfig = PairingConfig()
    training: TrainingConfig = TrainingConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    promotion: PromotionConfig = PromotionConfig()
    campaign: CampaignConfig = CampaignConfig()
    fanout: FanoutConfig = FanoutConfig()

    @model_validator(mode="after")
    def _fanout_fits_the_engine(self) -> RoundConfig:
        if self.fanout.mode == "replicas" and self.engine.name != "openai":
            raise ValueError(
                f"fanout.mode 'replicas' spreads shards over engine.base_urls and needs engine.name "
                f"'openai', got {self.engine.name!r}; for vLLM on GPU workers use fanout.mode 'deployment'"
            )
        served = self.evaluation.engine or self.engine
        if self.evaluation.enabled and served.name == "openai" and not self.training.lora.enabled:
            # A LoRA policy is loaded into the running servers (vLLM's runtime LoRA loading); full
            # weights would need servers restarted on them.
            raise ValueError(
                "evaluation runs the policy this round trains, which no engine.base_urls server holds: "
                "served replicas take it only as a LoRA adapter loaded at run time (training.lora.enabled), "
                "not as full weights; set evaluation.engine to an engine that loads models, e.g. "
                "{name: vllm} (or evaluation.enabled: false)"
            )
        if self.fanout.mode == "deployment" and self.run.root.startswith("memory://"):
            raise ValueError(
                "fanout.mode 'deployment' runs shards in other processes, which cannot see run.root "
                f"{self.run.root!r}; use a folder every worker shares or an object store (s3://...)"
            )
        return self

    @model_validator(mode="after")
    def _schemes_allowed(self) -> RoundConfig:
        allowed = self.run.allowed_schemes
        for key, ref, kind in self.references():
            credential = url_credentials(ref)
            if credential:
                raise ValueError(
                    f"{key} {redact(ref)!r} carries a credential in its URL ({credential}): credentials "
                    "come from the worker's environment (AWS_*, HF_TOKEN, a Prefect block), never from a "
                    "config; remove it from the URL"
                )
            if kind == "endpoint":
                check_base_url(key, ref, self.run.allowed_base_url_schemes)
                continue
            for scheme in url_schemes(ref, kind):
                if scheme not in allowed:
                    what = {"hf": "a Hugging Face id", "bundled": "a bundled model", "file": "a local path"}
                    kind_of = "a URL" if "://" in ref else what.get(scheme, "a URL")
                    raise ValueError(
                        f"{key} {ref!r} is {kind_of} (scheme {scheme!r}), which run.allowed_schemes does "
                        f"not allow (allowed: {', '.join(allowed)}); add {scheme!r} there to use it"
                    )
        return self

    def references(self) -> list[tuple[str, str, RefKind]]:
        """(key, value, kind) of every model and data reference the round reads or writes."""
        refs: list[tuple[str, str | None, RefKind]] = [
            ("run.root", self.run.root, "data"),
            ("model.path", self.model.path, "model"),
            ("model.adapter", self.model.adapter, "data"),
            ("personas.path", self.personas.path if self.personas.source == "file" else None, "data"),
            ("personas.dataset", self.personas.dataset if self.personas.source == "hf" else None, "dataset"),
            ("evaluation.prompts", self.evaluation.prompts, "evalset"),
            ("evaluation.trust", self.evaluation.trust, "evalset"),
            ("evaluation.original", self.evaluation.original, "model"),
            ("training.accelerate_config", self.training.accelerate_config, "data"),
            ("training.deepspeed", self.training.deepspeed, "data"),
        ]
        judge = self.evaluation.judge.model
        if judge is not None:
            refs += [
                ("evaluation.judge.model.path", judge.path, "model"),
                ("evaluation.judge.model.adapter", judge.adapter, "data"),
            ]
        refs.append(("evaluation.downstream.include_path", self.evaluation.downstream.include_path, "data"))
        for key, engine in (
            ("engine", self.engine),
            ("evaluation.engine", self.evaluation.engine),
            ("evaluation.judge.engine", self.evaluation.judge.engine),
        ):
            refs += [(f"{key}.base_urls", url, "endpoint") for url in (engine.base_urls if engine else ())]
        return [(key, ref, kind) for key, ref, kind in refs if ref]

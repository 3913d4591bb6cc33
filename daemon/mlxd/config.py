"""Configuration: one frozen ``Settings`` tree, loaded from etc/mlxd.toml.

Precedence, highest first: ``MLXD_<SECTION>__<KEY>`` environment variables, the TOML file,
the defaults below. Every key has a default, so an empty file is a valid config. The
``Field(description=...)`` texts are the single source of the config documentation:
``etc/mlxd.toml`` and the README's configuration table are rendered from them
(``mlxd check-config --render-toml`` / ``--render-markdown``) and a test keeps them in step.

Relative paths (``database``, ``archive_dir``, ``logging.file``) resolve against
``server.state_dir``, so the daemon writes to the same place whatever directory it was
started from.

One piece: the settings tree is the single source of the config documentation; its classes,
validators, the model table and the renderers stay together so that a key, its check and its
docs cannot drift apart.
"""

from __future__ import annotations

import ipaddress
import json
import os
import sys
import tomllib
import urllib.request
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError

from .models.names import alias_conflicts, derived_id, is_glob
from .resources import checkout_root, default_config_path

#: Exit status for a configuration error (sysexits.h EX_CONFIG); service units treat it as final.
EX_CONFIG = 78

#: The source checkout mlxd runs from (bin/, an editable install), None when installed.
CHECKOUT_ROOT = checkout_root()
#: etc/mlxd.toml in a checkout, else the copy inside the installed package (see resources).
DEFAULT_CONFIG_PATH = default_config_path()
BUNDLED_MODEL = "bundled:SmolLM2-135M-Instruct"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


class ConfigError(Exception):
    """The configuration cannot be used; the message names the key path and the fix."""


def default_state_dir() -> Path:
    """Where mlxd keeps its database, archives and logs when ``state_dir`` is empty."""
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "mlxd"
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "mlxd"


def default_log_file() -> Path:
    """macOS's usual place for a per-user daemon's log."""
    return Path.home() / "Library" / "Logs" / "mlxd" / "mlxd.log"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_true_for_a_number(cls, value: Any, info: Any) -> Any:
        """``true``/``false`` where a number belongs is a mistake, not 1 or 0 (pydantic would
        take ``max_batch_size = true`` as 1)."""
        if isinstance(value, bool) and info.field_name is not None:
            annotation = cls.model_fields[info.field_name].annotation
            if bool not in (annotation, *get_args(annotation)) and _numeric(annotation):
                raise ValueError(f"must be a number, not {str(value).lower()}")
        return value


def _numeric(annotation: Any) -> bool:
    """Whether a field's type takes numbers (int or float, alone or in a union)."""
    parts = [annotation, *get_args(annotation)]
    parts += [a for p in list(parts) for a in get_args(p)]  # Annotated[int, ...] in a union
    return any(p in (int, float) for p in parts)


class ServerSettings(_Section):
    """[server]: where and how the HTTP API listens."""

    host: str = Field(
        "127.0.0.1",
        description="Address to bind. Loopback by default; any other address needs an API key "
        "([security]).",
    )
    port: int = Field(8765, ge=1, le=65535, description="TCP port of the HTTP API.")
    state_dir: str = Field(
        "",
        description="Directory for the database, archives and log; relative paths below resolve "
        "against it. Empty: ~/Library/Application Support/mlxd (macOS) or "
        "$XDG_STATE_HOME/mlxd, else ~/.local/state/mlxd (Linux).",
    )
    max_body_bytes: int = Field(
        32 * 1024 * 1024,
        ge=1024,
        description="Largest request body accepted; bigger requests get 413. Agent clients resend "
        "the whole history each turn, so keep it generous.",
    )
    body_timeout_seconds: float = Field(
        60.0,
        gt=0,
        description="Longest time a request body may take to arrive, first byte to last; a client "
        "that sends part of its body and goes quiet gets 408 and its connection is freed.",
    )
    max_tokens_limit: int = Field(
        32768,
        ge=1,
        description="Upper bound for max_tokens / max_output_tokens; larger requests get 400.",
    )
    request_timeout_seconds: float = Field(
        600.0,
        gt=0,
        description="Longest time one generation may run; then it ends with finish_reason "
        "'length' (non-streaming and streaming alike).",
    )
    shutdown_timeout_seconds: float = Field(
        20.0,
        gt=0,
        le=300,
        description="On SIGTERM/SIGINT, how long in-flight requests may take to finish before "
        "they are cancelled with an error. Service files allow this plus 10 s.",
    )
    cors_origins: list[str] = Field(
        default_factory=list,
        description="Browser origins allowed by CORS. Empty: any http(s) origin on localhost, "
        "127.0.0.1 or [::1] (any port). Otherwise exactly these; '*' allows every origin.",
    )
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Extra Host header names accepted besides localhost, 127.0.0.1, [::1] and "
        "the bound address (protects against DNS rebinding). '*' accepts any.",
    )
    sse_keepalive_seconds: float = Field(
        10.0,
        gt=0,
        description="Interval of keep-alives while a stream waits (long prefill, queue): an SSE "
        "comment in Chat Completions, a response.in_progress event in Responses, a ping event "
        "in Anthropic Messages.",
    )

    def is_loopback(self) -> bool:
        """True when the bind address only accepts connections from this machine."""
        if self.host in LOOPBACK_NAMES:
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def local_url(self) -> str:
        """Where a process on this machine reaches the daemon (a wildcard bind: loopback)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"


def loopback_opener() -> urllib.request.OpenerDirector:
    """A urllib opener for requests to this machine's daemon (``ServerSettings.local_url``):
    no proxies, so an ``http_proxy`` in the environment cannot capture a loopback request."""
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


class SecuritySettings(_Section):
    """[security]: who may call the API."""

    api_keys: list[str] = Field(
        default_factory=list,
        description="Accepted API keys (Authorization: Bearer <key>). Empty with no key file: no "
        "authentication (allowed on loopback only). /health stays open.",
    )
    api_key_file: str = Field(
        "",
        description="File with one API key per line (# comments allowed), read at start and on "
        "reload; keeps keys out of the config file.",
    )

    @field_validator("api_keys")
    @classmethod
    def _no_empty_key(cls, keys: list[str]) -> list[str]:
        if any(not key.strip() for key in keys):
            raise ValueError(
                "an empty API key would match an empty Bearer token. Hint: remove the empty "
                'string, or use a long random key (python -c "import secrets; '
                'print(secrets.token_urlsafe(32))").'
            )
        return keys


class ModelSettings(_Section):
    """[model]: which model is served and its default generation parameters."""

    path: str = Field(
        BUNDLED_MODEL,
        description="Model to serve: 'bundled:SmolLM2-135M-Instruct' (shipped with mlxd), a "
        "Hugging Face repo id ('mlx-community/Qwen3-4B-4bit'), a local MLX/HF model directory, "
        "or a .gguf file (llama architecture).",
    )
    id: str = Field(
        "",
        description="Model id reported by /v1/models and in responses. Empty: derived from path.",
    )
    dtype: Literal["auto", "keep", "float32", "float16", "bfloat16"] = Field(
        "auto",
        description="Weight precision. 'keep' serves the weights as stored; 'auto' dequantizes "
        "small quantized models to float32 on the CPU backend (much faster there) and keeps them "
        "on GPU backends; or force a float dtype.",
    )
    context_length: int = Field(
        0,
        ge=0,
        description="Longest prompt plus completion in tokens. 0: the model's own limit.",
    )
    temperature: float = Field(
        0.7, ge=0, le=2, description="Default sampling temperature when a request gives none."
    )
    top_p: float = Field(
        1.0, gt=0, le=1, description="Default nucleus sampling cut-off when a request gives none."
    )
    max_tokens: int = Field(
        2048,
        ge=1,
        description="Default completion length when a request gives no max_tokens.",
    )
    reasoning: Literal["separate", "strip", "inline"] = Field(
        "separate",
        description="What to do with <think>...</think> blocks: 'separate' returns them as "
        "reasoning_content / reasoning items, 'strip' drops them, 'inline' leaves them in the "
        "text.",
    )

    # Residency (many models, one daemon; see mlxd.models.registry) --------------------
    aliases: list[str] = Field(
        default_factory=list,
        description="Other names that reach this model: exact names ('gpt-4o') or glob "
        "patterns ('gpt-5*', 'claude-*'), so agent clients' default model names reach a local "
        "model. A name may match one entry only.",
    )
    keep_alive: float = Field(
        0.0,
        ge=0,
        description="Seconds without requests before the model is unloaded and its memory "
        "returned; 0 keeps it loaded. A request's keep_alive field (as in Ollama) sets it for "
        "this model from then on.",
    )
    preload: bool = Field(
        True,
        description="Load at start (/health waits for it); false loads it on its first request.",
    )
    pinned: bool = Field(
        False,
        description="Never evicted to make room for another model (idle keep_alive still "
        "applies). A pinned model larger than engine.memory_budget_bytes is a config error.",
    )

    @field_validator("aliases")
    @classmethod
    def _aliases_not_empty(cls, value: list[str]) -> list[str]:
        if any(not a.strip() for a in value):
            raise ValueError("an alias must not be empty")
        return [a.strip() for a in value]

    @field_validator("path")
    @classmethod
    def _path_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError(
                "must not be empty; use 'bundled:SmolLM2-135M-Instruct' for the default"
            )
        return value.strip()


class EngineSettings(_Section):
    """[engine]: the MLX thread: batching, caches, backend tuning."""

    max_batch_size: int | Literal["auto"] = Field(
        "auto",
        description="Most sequences decoded together per model (continuous batching): a number "
        "from 1 to 256, or 'auto': as many as fit at the model's full context in its share of the "
        "memory budget (the configured models split it), at most 8 on the CPU and on Apple "
        "GPUs and 64 on CUDA. A loaded model is resized once idle when this or the budget "
        "changes.",
    )
    max_queue: int = Field(
        64,
        ge=1,
        description="Most requests waiting for a batch slot; beyond it requests get 503 with "
        "Retry-After.",
    )

    @field_validator("max_batch_size", mode="before")
    @classmethod
    def _slots(cls, value: Any) -> Any:
        """One clear message for both forms (the union would report each member's error)."""
        text = value.strip().lower() if isinstance(value, str) else value
        if text == "auto":
            return "auto"
        number = None
        if isinstance(text, int | float | str) and not isinstance(text, bool):
            try:
                number = float(text)
            except ValueError:
                number = None
        if number is None or not number.is_integer() or not 1 <= number <= 256:
            shown = str(value).lower() if isinstance(value, bool) else repr(value)
            raise ValueError(f"must be 'auto' or a whole number from 1 to 256, not {shown}")
        return int(number)

    prefill_step_size: int = Field(
        512,
        ge=16,
        description="Prompt tokens processed per step for one prompt (bounds memory of long "
        "prompts); while others decode, a step prefills at most 8 such chunks, admitting as "
        "many waiting prompts as fit.",
    )
    prompt_cache_bytes: int = Field(
        512 * 1024 * 1024,
        ge=0,
        description="Memory budget for reusable prompt (KV) caches of earlier requests; 0 "
        "disables reuse.",
    )
    prompt_cache_dir: str = Field(
        "prompt_cache",
        description="Directory of the prompt cache's disk tier: KV caches that survive "
        "restarts, unloads and model switches, one subdirectory per model identity (relative: "
        "under state_dir).",
    )
    prompt_cache_disk_bytes: int = Field(
        4 * 1024**3,
        ge=0,
        description="Disk budget of the prompt cache's disk tier, all models together; least "
        "recently used entries are deleted to stay under it. 0 disables the disk tier.",
    )
    mlx_cache_limit_bytes: int = Field(
        1024**3,
        ge=0,
        description="Cap on MLX's buffer cache (freed buffers kept for reuse, "
        "mx.set_cache_limit); without one it grows toward the memory limit. 0 keeps no cache.",
    )
    blas: str = Field(
        "auto",
        description="CPU backend only: 'auto' loads an optimized OpenBLAS if one is installed, "
        "'off' keeps MLX's bundled BLAS, or a path to a BLAS shared library.",
    )
    warmup: bool = Field(
        True,
        description="Run a short prefill and decode after loading, before reporting ready, so no "
        "request waits for kernel compilation.",
    )
    memory_budget_bytes: int = Field(
        0,
        ge=0,
        description="Memory the loaded models may use together (weights plus KV cache for "
        "each model's batch slots at its context_length). Before a load, least recently used "
        "idle models that are not pinned are unloaded until the new one fits. 0: derived from "
        "the machine: Apple GPU: Metal's recommended working set; CUDA: 90% of the GPU's memory; "
        "CPU: 60% of physical RAM.",
    )


class DistributedSettings(_Section):
    """[distributed]: one model across several machines, for ranks started by mlx.launch."""

    hosts: list[str] = Field(
        default_factory=list,
        description="Machines of a group serving one model, rank 0 (this machine) first; IP "
        "addresses for the ring backend. Set (or hostfile): `mlxd serve` starts the group with "
        "mlx.launch and keeps it running. Empty: one process (`mlxd distributed --run -n N` "
        "tries N ranks on this machine).",
    )
    hostfile: str = Field(
        "",
        description="An mlx.launch hostfile (JSON: ssh names, IPs, RDMA devices) used instead "
        "of hosts. Relative: to the config file's directory.",
    )
    backend: Literal["ring", "jaccl", "mpi", "nccl"] = Field(
        "ring",
        description="MLX's distributed backend: 'ring' (TCP, Ethernet or Thunderbolt), "
        "'jaccl' (RDMA over Thunderbolt 5), 'mpi', 'nccl' (CUDA).",
    )
    sharding: Literal["auto", "pipeline", "tensor"] = Field(
        "auto",
        description="How the model is split: 'pipeline' (consecutive layers per rank; any "
        "number of ranks up to the layer count), 'tensor' (every layer split; the head counts "
        "must divide by the number of ranks), 'auto' (pipeline).",
    )
    step_timeout: float = Field(
        120.0,
        gt=0,
        description="Seconds one step may wait on the other ranks before the group counts as "
        "broken (requests then get 503 and /health names the ranks).",
    )
    starting_port: int = Field(
        32323,
        ge=1,
        le=65535,
        description="Ring backend: the first TCP port ranks listen on (one more per rank); open "
        "these between the machines.",
    )


class RoutingSettings(_Section):
    """[routing]: which [models.<id>] entry answers a request's model name."""

    default: str = Field(
        "",
        description="Id of the entry that answers requests whose model is missing or empty. "
        "Empty: the first [models.<id>] entry.",
    )
    fallback: str = Field(
        "",
        description="Id of the entry that answers names matching no id or alias. Empty: such "
        "names get 404 model_not_found listing the ids. (A config with a single [model] "
        "section answers every name with it, as before [models] existed.)",
    )


class ConversationSettings(_Section):
    """[conversations]: the durable store behind /v1/responses."""

    ttl_seconds: int = Field(
        3600,
        gt=0,
        description="A conversation expires this long after its last activity and is archived.",
    )
    sweep_interval_seconds: float = Field(
        60.0, gt=0, description="How often expired conversations are archived."
    )
    database: str = Field(
        "conversations.sqlite3", description="SQLite database file (relative: under state_dir)."
    )
    archive_dir: str = Field(
        "conversation_logs",
        description="Directory for archived conversations, one JSON file each (relative: under "
        "state_dir).",
    )


class LoggingSettings(_Section):
    """[logging]: structured logs."""

    level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Lowest level written: debug, info, warning or error."
    )
    file: str = Field(
        "",
        description="JSON-lines log file. Empty: ~/Library/Logs/mlxd/mlxd.log (macOS) or "
        "<state_dir>/logs/mlxd.log (Linux). Relative: under state_dir.",
    )
    format: Literal["auto", "console", "json"] = Field(
        "auto",
        description="Standard error output: 'console' (readable), 'json', or 'auto' (console on "
        "a terminal, json otherwise). The file is always JSON.",
    )
    max_bytes: int = Field(
        10 * 1024 * 1024, ge=0, description="Rotate the log file at this size; 0 never rotates."
    )
    backup_count: int = Field(5, ge=0, description="Rotated log files kept (mlxd.log.1 ...).")

    @field_validator("level", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value


class Settings(BaseSettings):
    """The whole configuration; frozen, so a reload builds a new tree and swaps it."""

    model_config = SettingsConfigDict(
        env_prefix="MLXD_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        case_sensitive=False,
    )

    server: ServerSettings = Field(default_factory=ServerSettings)  # type: ignore[arg-type]
    security: SecuritySettings = Field(default_factory=SecuritySettings)  # type: ignore[arg-type]
    model: ModelSettings = Field(default_factory=ModelSettings)  # type: ignore[arg-type]
    models: dict[str, ModelSettings] = Field(
        default_factory=dict,
        description="Several models, one table each: [models.<id>] with the keys of [model] "
        "(the table name is the id clients send). Replaces [model]; use one or the other.",
    )
    routing: RoutingSettings = Field(default_factory=RoutingSettings)  # type: ignore[arg-type]
    engine: EngineSettings = Field(default_factory=EngineSettings)  # type: ignore[arg-type]
    conversations: ConversationSettings = Field(default_factory=ConversationSettings)  # type: ignore[arg-type]
    logging: LoggingSettings = Field(default_factory=LoggingSettings)  # type: ignore[arg-type]
    distributed: DistributedSettings = Field(default_factory=DistributedSettings)  # type: ignore[arg-type]

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The TOML file arrives as init kwargs; environment variables must beat it.
        return (env_settings, init_settings)

    @model_validator(mode="after")
    def _exposure_needs_key(self) -> Settings:
        if not self.server.is_loopback() and not (
            self.security.api_keys or self.security.api_key_file
        ):
            raise ValueError(
                f"server.host = {self.server.host!r} is not a loopback address and no API key is "
                'configured. Hint: keep host = "127.0.0.1", or set [security] api_keys = '
                '["<a long random string>"] (or api_key_file) before exposing mlxd to a network.'
            )
        return self

    @model_validator(mode="after")
    def _model_table_is_consistent(self) -> Settings:
        problems = table_problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    # Paths resolved against state_dir -------------------------------------------------
    def state_dir(self) -> Path:
        raw = self.server.state_dir
        return Path(raw).expanduser() if raw else default_state_dir()

    def _under_state(self, raw: str) -> Path:
        path = Path(raw).expanduser()
        return path if path.is_absolute() else self.state_dir() / path

    def database_path(self) -> Path:
        return self._under_state(self.conversations.database)

    def archive_path(self) -> Path:
        return self._under_state(self.conversations.archive_dir)

    def log_path(self) -> Path:
        if self.logging.file:
            return self._under_state(self.logging.file)
        if sys.platform == "darwin":
            return default_log_file()
        return self.state_dir() / "logs" / "mlxd.log"

    def api_keys(self) -> list[str]:
        """Keys from the config plus the key file. Raises ConfigError if the file is unreadable."""
        keys = list(self.security.api_keys)
        if self.security.api_key_file:
            path = Path(self.security.api_key_file).expanduser()
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except OSError as exc:
                raise ConfigError(
                    f"security.api_key_file: cannot read {path}: {exc.strerror}. Hint: create the "
                    "file with one key per line, or remove api_key_file."
                ) from exc
            keys += [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        if not keys and not self.server.is_loopback():
            # The validator saw api_key_file set; an empty file must not open the network.
            raise ConfigError(
                f"server.host = {self.server.host!r} is not a loopback address and "
                f"security.api_key_file ({self.security.api_key_file}) holds no keys. Hint: "
                'write one key per line into it, or keep host = "127.0.0.1".'
            )
        return keys


SECTIONS: dict[str, type[_Section]] = {
    "server": ServerSettings,
    "security": SecuritySettings,
    "model": ModelSettings,
    "routing": RoutingSettings,
    "engine": EngineSettings,
    "conversations": ConversationSettings,
    "logging": LoggingSettings,
    "distributed": DistributedSettings,
}


def config_path_from(arg: str | os.PathLike[str] | None) -> Path | None:
    """The config file to read: --config, else $MLXD_CONFIG, else the default config
    (etc/mlxd.toml in a checkout, the packaged copy when installed) if present."""
    if arg:
        return Path(arg).expanduser()
    env = os.environ.get("MLXD_CONFIG")
    if env:
        return Path(env).expanduser()
    return DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.exists() else None


def load_settings(path: Path | None) -> Settings:
    """Read, validate and freeze the configuration. Raises ConfigError with key path and hint."""
    data: dict[str, Any] = {}
    where = "defaults"
    if path is not None:
        where = str(path)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise ConfigError(
                f"config file {path} does not exist. Hint: pass --config with an existing file, or "
                f"copy {DEFAULT_CONFIG_PATH} there."
            ) from None
        except OSError as exc:
            raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from exc
        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}. Hint: fix the syntax.") from exc
        for section, value in data.items():
            if section == "models":
                _check_models_table(path, value)
                continue
            if section not in SECTIONS:
                raise ConfigError(
                    f"{path}: unknown section [{section}]. Hint: valid sections are "
                    + ", ".join(f"[{s}]" for s in SECTIONS)
                    + ", [models.<id>]."
                )
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: '{section}' must be a [{section}] table.")
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, where)) from None
    except SettingsError as exc:  # an MLXD_* variable that does not parse (value not echoed)
        raise ConfigError(
            f"invalid configuration (environment): {exc}. Hint: list values in MLXD_* "
            "variables are JSON, e.g. MLXD_SECURITY__API_KEYS='[\"<key>\"]'."
        ) from None


def _check_models_table(path: Path, value: Any) -> None:
    """``models`` must be a table of tables: ``[models.<id>]``."""
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise ConfigError(
            f"{path}: 'models' must hold one table per model. Hint: write [models.<id>] "
            'with path = "..." under it, e.g. [models.smollm2].'
        )


def _section_of(loc: tuple[int | str, ...]) -> tuple[str, type[_Section] | None, int]:
    """The section a validation error is in, its class, and where its key sits in ``loc``."""
    if loc and loc[0] == "models":
        return f"models.{loc[1]}" if len(loc) > 1 else "models", ModelSettings, 2
    name = str(loc[0]) if loc else ""
    return name, SECTIONS.get(name), 1


#: Keys whose values are never echoed in an error message (or, through it, in logs/health).
SECRET_FIELDS = frozenset({"api_keys"})


def _explain(exc: ValidationError, where: str) -> str:
    """One line per problem: the dotted key path, what is wrong, and a hint for the fix."""
    lines = [f"invalid configuration ({where}):"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            section, cls, depth = _section_of(err["loc"])
            valid = (
                ", ".join(cls.model_fields) if cls is not None and len(err["loc"]) > depth else ""
            )
            hint = f"Hint: check the spelling; valid keys in [{section}]: {valid}."
            lines.append(f"  {loc}: unknown key. {hint}")
        elif err["type"] == "value_error":
            lines.append(f"  {loc or 'config'}: {err['msg'].removeprefix('Value error, ')}")
        else:
            field = _field_for(err["loc"])
            hint = f" Hint: {field.description}" if field is not None and field.description else ""
            got = "***" if SECRET_FIELDS.intersection(map(str, err["loc"])) else err.get("input")
            lines.append(f"  {loc}: {err['msg']} (got {got!r}).{hint}")
    return "\n".join(lines)


def _field_for(loc: tuple[int | str, ...]) -> Any:
    _, cls, depth = _section_of(loc)
    if cls is not None and len(loc) > depth:
        return cls.model_fields.get(str(loc[depth]))
    return None


# The model table (several models, one daemon; routing in mlxd.models.registry) ----------
def is_legacy(settings: Settings) -> bool:
    """True when the config uses the single ``[model]`` section (or no model config at all)."""
    return not settings.models


def model_table(settings: Settings) -> dict[str, ModelSettings]:
    """The effective table, in file order, each entry's ``id`` set to its table name."""
    if settings.models:
        return {key: entry.model_copy(update={"id": key}) for key, entry in settings.models.items()}
    entry = settings.model
    entry_id = entry.id or derived_id(entry.path)
    return {entry_id: entry.model_copy(update={"id": entry_id})}


def table_problems(settings: Settings) -> list[str]:
    """What makes the table unusable, one message per problem with its key path and a hint."""
    problems: list[str] = []
    if settings.models and "model" in settings.model_fields_set:
        problems.append(
            "[model] and [models.<id>] are both given. Hint: move the [model] keys into a "
            "[models.<id>] table (the table name becomes the id) and delete [model]."
        )
    for key, entry in settings.models.items():
        if not key.strip() or is_glob(key) or key != key.strip():
            problems.append(
                f"models.{key!r}: an id must be a plain name (no spaces at the ends, no * ? [)."
            )
        if entry.id and entry.id != key:
            problems.append(
                f"models.{key}.id = {entry.id!r}: the table name is the id. Hint: remove id, or "
                f"rename the table to [models.{entry.id}]."
            )
    table = model_table(settings)
    for name in ("default", "fallback"):
        value = getattr(settings.routing, name)
        if value and value not in table:
            problems.append(
                f"routing.{name} = {value!r} names no configured model. Hint: use one of: "
                + ", ".join(table)
                + "."
            )
    problems += alias_conflicts({eid: e.aliases for eid, e in table.items()})
    return problems


def effective_config(settings: Settings) -> dict[str, Any]:
    """The settings as plain data, with API keys masked (never print or log a key)."""
    data = settings.model_dump(mode="json")
    data["security"]["api_keys"] = ["***"] * len(settings.security.api_keys)
    # The effective table: a lone [model] section shows as the one entry it stands for.
    data.pop("model", None)
    data["models"] = {
        entry_id: entry.model_dump(mode="json") for entry_id, entry in model_table(settings).items()
    }
    return data


# Documentation rendered from the Field descriptions ------------------------------------
def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot render {value!r}")


def render_toml() -> str:
    """The commented etc/mlxd.toml: every key with its default and its description."""
    out = [
        "# mlxd configuration. Every key is shown with its default; delete what you do not change.",
        "# Environment variables MLXD_<SECTION>__<KEY> override this file "
        "(e.g. MLXD_SERVER__PORT=9000).",
        "# Edits are applied while the daemon runs (a new [model] path loads the new model);",
        "# a file that does not validate is rejected and the last good configuration stays.",
        "# Generated from daemon/mlxd/config.py (mlxd check-config --render-toml).",
    ]
    for name, section in SECTIONS.items():
        out += ["", f"[{name}]"]
        doc = (section.__doc__ or "").split(":", 1)[-1].strip()
        if doc:
            out.append(f"# {doc}")
        for key, field in section.model_fields.items():
            default = field.get_default(call_default_factory=True)
            for line in _wrap(field.description or "", 88):
                out.append(f"# {line}")
            out.append(f"{key} = {_toml_value(default)}")
        if name == "model":
            out += ["", *(f"# {line}" if line else "#" for line in MODELS_EXAMPLE)]
    return "\n".join(out) + "\n"


#: The commented example under [model] in etc/mlxd.toml: how to serve several models.
MODELS_EXAMPLE = (
    "Several models: replace [model] with one [models.<id>] table per model. Each takes the",
    "keys of [model]; the table name is the id clients send as 'model'. Models load when first",
    "asked for (or at start with preload = true), share engine.memory_budget_bytes (least",
    "recently used idle ones are unloaded to make room) and unload after keep_alive idle",
    "seconds. [routing] picks the default and an optional fallback for unknown names.",
    "",
    "[models.smollm2]",
    'path = "bundled:SmolLM2-135M-Instruct"',
    'aliases = ["gpt-5*", "claude-*"]',
    "pinned = true",
    "",
    "[models.smollm2-f32]",
    'path = "bundled:SmolLM2-135M-Instruct"',
    'dtype = "float32"',
    "preload = false",
    "keep_alive = 300",
)


def render_markdown() -> str:
    """The README's configuration table."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for name, section in SECTIONS.items():
        for key, field in section.model_fields.items():
            default = _toml_value(field.get_default(call_default_factory=True))
            desc = (field.description or "").replace("|", "\\|")
            rows.append(f"| `{name}.{key}` | `{default}` | {desc} |")
        if name == "model":
            desc = str(Settings.model_fields["models"].description)
            rows.append(f"| `models.<id>.<key>` | `{{}}` | {desc} |")
    return "\n".join(rows) + "\n"


def _wrap(text: str, width: int) -> list[str]:
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    if line:
        lines.append(line)
    return lines

"""Every setting of the backend, read once from the environment into one typed object.

No other module reads ``os.environ``: the serve command builds a :class:`Settings` and passes it
down, and tests build one by hand. ``SETTINGS_DOC`` is the source of README's configuration table.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

from molmo_backend.errors import BadInput
from molmo_backend.images.address_policy import PolicyError, parse_entries

#: what a <TextArea> for the image without its own ``prompt`` is filled with the answer to
DEFAULT_CAPTION_PROMPT = "Describe this image in one sentence."


class SettingsError(BadInput, ValueError):
    """A configuration value that cannot be used; the message names the variable (exit code 2)."""


def _hf_home(env: Mapping[str, str]) -> Path:
    return Path(env.get("HF_HOME") or Path.home() / ".cache" / "huggingface")


@dataclass(frozen=True)
class Settings:
    # model
    model: str = "allenai/Molmo2-4B"
    revision: str | None = None
    demo: str = "auto"  # "auto": demo model when there is no GPU and no local weights; "1"; "0"; "random"
    device: str = "auto"  # "auto", "cuda", "cuda:1", "cpu"
    gpus: str = ""  # "": one device (MOLMO_DEVICE); "all"; "0,1": one model replica per GPU
    dtype: str = "auto"  # "auto" (bf16 on CUDA, float32 on CPU), "bfloat16", "float16", "float32"
    max_new_tokens: int = 1024  # Molmo2 spends about 10 tokens a point: 1024 holds ~100 points
    max_batch: int | None = None  # None: the engine's own default (engine/inprocess.py)
    decoder: str = "fast"  # "fast" (rows in cache slots, continuous batching) or "generate" (plain HF)
    cuda_graphs: str = "1"
    compile_step: str = "0"  # torch.compile the opened tasks' decode step (CUDA graphs on CUDA only)
    triton_kernels: str = "1"  # decode attention split over the keys, rotary embedding: Triton (CUDA)
    draft: str = "0"  # check the point format's guessed tokens in small decode steps (engine/drafting.py)
    prompt_template: str | None = None  # None: the trained phrasing of the model's family
    point_width: float = 0.75
    min_point_score: float = 0.0  # points scored below this are dropped (docs/confidence.md)
    caption_prompt: str = DEFAULT_CAPTION_PROMPT  # question for <TextArea toName=image> without prompt=
    cache_dir: Path = field(default_factory=lambda: _hf_home(os.environ) / "molmo-backend")
    # engine
    engine: str = "transformers"  # "transformers" (this process, local GPUs) or "openai" (vLLM/SGLang)
    engine_url: str | None = None
    engine_api_key: str | None = None
    engine_concurrency: int = 32
    engine_timeout: float = 60.0
    # Label Studio
    label_studio_url: str | None = None
    label_studio_api_key: str | None = None
    predict_deadline: float = 90.0  # seconds; a bulk /predict answers what is finished by then
    result_cache: int = 20000  # finished predictions kept for the next retrieve (tasks)
    write_back: str = "auto"  # "auto": write deferred predictions to LS when URL + key are set
    # image fetching
    fetch_timeout: float = 15.0
    max_image_bytes: int = 64 * 1024 * 1024
    max_image_pixels: int = 100_000_000
    allowed_hosts: tuple[str, ...] = ()
    local_files_root: Path | None = None
    # HTTP server
    host: str = "0.0.0.0"
    port: int = 9090
    threads: int = 32
    basic_auth_user: str | None = None
    basic_auth_pass: str | None = None
    max_request_bytes: int = 64 * 1024 * 1024
    log_level: str = "INFO"
    log_format: str = "json"  # "json" or "text"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides) -> Settings:
        """Settings from environment variables (see ``SETTINGS_DOC``), then ``overrides``."""
        env = os.environ if env is None else env
        values: dict = {}
        for f in fields(cls):
            var = ENV_NAMES[f.name]
            raw = env.get(var)
            if raw is None or raw == "":
                continue
            values[f.name] = _convert(f.name, var, raw)
        if "cache_dir" not in values:
            values["cache_dir"] = _hf_home(env) / "molmo-backend"
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.prompt_template is not None and "{label}" not in self.prompt_template:
            raise SettingsError("MOLMO_PROMPT_TEMPLATE must contain '{label}'")
        if self.demo not in ("auto", "0", "1", "random"):
            raise SettingsError("MOLMO_DEMO must be auto, 1, 0 or random")
        if (self.max_batch is not None and self.max_batch < 1) or self.max_new_tokens < 1 or self.threads < 1:
            raise SettingsError("MOLMO_MAX_BATCH, MOLMO_MAX_NEW_TOKENS and THREADS must be >= 1")
        if self.decoder not in ("fast", "generate"):
            raise SettingsError("MOLMO_DECODER must be fast or generate")
        if {self.cuda_graphs, self.compile_step, self.triton_kernels, self.draft} - {"0", "1"}:
            raise SettingsError(
                "MOLMO_CUDA_GRAPHS, MOLMO_COMPILE, MOLMO_TRITON_KERNELS and MOLMO_DRAFT must be 1 or 0"
            )
        if self.engine not in ("transformers", "openai"):
            raise SettingsError("MOLMO_ENGINE must be transformers or openai")
        if self.engine == "openai" and not self.engine_url:
            raise SettingsError("MOLMO_ENGINE=openai needs MOLMO_ENGINE_URL (e.g. http://vllm:8000/v1)")
        if bool(self.basic_auth_user) != bool(self.basic_auth_pass):
            raise SettingsError("set both BASIC_AUTH_USER and BASIC_AUTH_PASS, or neither")
        if self.log_format not in ("json", "text"):
            raise SettingsError("LOG_FORMAT must be json or text")
        if not 0.0 <= self.min_point_score <= 1.0:
            raise SettingsError("MOLMO_MIN_POINT_SCORE must be between 0 and 1")
        if not self.caption_prompt.strip():
            raise SettingsError("MOLMO_CAPTION_PROMPT must not be blank")
        try:
            parse_entries(self.allowed_hosts)
        except PolicyError as exc:
            raise SettingsError(f"MOLMO_ALLOWED_HOSTS: {exc}") from None
        if self.predict_deadline < 0 or self.result_cache < 0:
            raise SettingsError("MOLMO_PREDICT_DEADLINE and MOLMO_RESULT_CACHE must be >= 0")
        if self.write_back not in ("auto", "0", "1"):
            raise SettingsError("MOLMO_WRITE_BACK must be auto, 1 or 0")
        if self.write_back == "1" and not (self.label_studio_url and self.label_studio_api_key):
            raise SettingsError("MOLMO_WRITE_BACK=1 needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY")

    @property
    def writes_back(self) -> bool:
        """Whether the server stores deferred predictions in Label Studio itself."""
        return self.write_back != "0" and bool(self.label_studio_url and self.label_studio_api_key)


# field name -> (environment variable, description)
SETTINGS_DOC: dict[str, tuple[str, str]] = {
    "model": ("MOLMO_MODEL", "Hub id or local folder of a Molmo2 checkpoint"),
    "revision": ("MOLMO_REVISION", "Hub revision (branch, tag or commit) of MOLMO_MODEL"),
    "demo": (
        "MOLMO_DEMO",
        "`auto`: use the tiny demo model (trained on synthetic coloured shapes "
        "only; not Molmo) when there is no GPU and no local weights; `1`: always; `0`: never; "
        "`random`: the untrained random tiny model (for protocol tests)",
    ),
    "device": ("MOLMO_DEVICE", "`auto`, `cuda`, `cuda:N` or `cpu`"),
    "gpus": (
        "MOLMO_GPUS",
        "Several GPUs: `all` or indices like `0,1`: one model replica on each, "
        "the scheduler feeds them all (empty: the one MOLMO_DEVICE)",
    ),
    "dtype": ("MOLMO_DTYPE", "`auto` (bfloat16 on CUDA, float32 on CPU), `bfloat16`, `float16`, `float32`"),
    "max_new_tokens": (
        "MOLMO_MAX_NEW_TOKENS",
        "Cap on tokens generated per (image, label). Molmo2 "
        "spends about 10 tokens a point, so 1024 holds about 100 points; an answer "
        "that reaches the cap is logged with its task and counted (`truncated`)",
    ),
    "max_batch": (
        "MOLMO_MAX_BATCH",
        "Most bulk (image, label) rows decoding together (default 256); fewer where the cache "
        "memory (70% of the GPU's free memory after loading; on the CPU, of the RAM available) "
        "holds fewer rows of 1,024 tokens; opened tasks have 16 rows of their own. For `generate` "
        "and Molmo v1: most pairs in one padded batch (default 128)",
    ),
    "decoder": (
        "MOLMO_DECODER",
        "`fast`: continuous batching: rows in cache slots join and leave "
        "between decode steps, one prefill per image, CUDA-graph decode steps; `generate`: "
        "plain Hugging Face generate() (slower; a reference)",
    ),
    "cuda_graphs": (
        "MOLMO_CUDA_GRAPHS",
        "`1`: replay decode steps as a CUDA graph (fast decoder on CUDA); `0`: eager steps",
    ),
    "compile_step": (
        "MOLMO_COMPILE",
        "`1`: compile the opened tasks' decode step with torch.compile "
        "at start, before it is captured as a CUDA graph (CUDA with graphs on). Start-up "
        "with Molmo2-8B on an H200: 109 s to ready with an empty inductor cache, 56 s "
        "with a warm one, and no latency gain measured; `0` (default): don't",
    ),
    "triton_kernels": (
        "MOLMO_TRITON_KERNELS",
        "`1` (default): decode attention split over the keys and the rotary embedding in one "
        "kernel, in Triton, on CUDA (each checked at start and left out if it disagrees or Triton "
        "cannot build its kernels); `0`: CUTLASS's attention kernel, Hugging Face's rotary embedding",
    ),
    "draft": (
        "MOLMO_DRAFT",
        "`1`: in decode steps of up to 64 rows, check the tokens Molmo2's point format fixes "
        "(the spaces, the next point's id, most often the first digit of x) in the same step as "
        "the row's next token, so one step can confirm several; answers stay greedy's "
        "(engine/drafting.py). Not yet measured on a GPU; `0` (default): one token a step",
    ),
    "prompt_template": (
        "MOLMO_PROMPT_TEMPLATE",
        "Prompt per label; `{label}` is replaced by the "
        "label (or its `prompt` attribute in the label config). Default: the "
        "model family's trained pointing phrasing",
    ),
    "point_width": ("MOLMO_POINT_WIDTH", "Keypoint dot size, percent of the image width"),
    "min_point_score": (
        "MOLMO_MIN_POINT_SCORE",
        "Drop keypoints whose confidence (0-1: the "
        "probability Molmo gave to emitting the point, docs/confidence.md) is "
        "below this; `0` keeps all",
    ),
    "caption_prompt": (
        "MOLMO_CAPTION_PROMPT",
        'Question answered into a `<TextArea toName="image">` '
        "that has no `prompt` attribute (and is not the interactive prompt box)",
    ),
    "cache_dir": (
        "MOLMO_CACHE_DIR",
        "Where the random demo model is built (default `$HF_HOME/molmo-backend`)",
    ),
    "engine": ("MOLMO_ENGINE", "`transformers` (in this process) or `openai` (a vLLM/SGLang server)"),
    "engine_url": (
        "MOLMO_ENGINE_URL",
        "Base URL of the OpenAI-compatible server, e.g. `http://vllm:8000/v1`",
    ),
    "engine_api_key": ("MOLMO_ENGINE_API_KEY", "Bearer key for that server, if it wants one"),
    "engine_concurrency": ("MOLMO_ENGINE_CONCURRENCY", "Most requests in flight to that server"),
    "engine_timeout": ("MOLMO_ENGINE_TIMEOUT", "Seconds allowed for one request to that server"),
    "label_studio_url": ("LABEL_STUDIO_URL", "Label Studio's URL, for fetching uploaded images"),
    "label_studio_api_key": ("LABEL_STUDIO_API_KEY", "Label Studio personal access token or legacy token"),
    "predict_deadline": (
        "MOLMO_PREDICT_DEADLINE",
        "Seconds a bulk /predict (Retrieve predictions) "
        "computes before it answers with the tasks finished by then; the rest "
        "go on and are answered by the next retrieve (or written back). Keep it "
        "under Label Studio's ML_TIMEOUT_PREDICT (100 s); `0`: no deadline",
    ),
    "result_cache": (
        "MOLMO_RESULT_CACHE",
        "Most predictions finished after their retrieve answered "
        "that are kept in memory for the next one (tasks)",
    ),
    "write_back": (
        "MOLMO_WRITE_BACK",
        "`auto`: with LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY set, "
        "write those predictions to Label Studio as they finish; `1`: the same, and "
        "refuse to start without them; `0`: never",
    ),
    "fetch_timeout": ("MOLMO_FETCH_TIMEOUT", "Seconds allowed for one image fetch"),
    "max_image_bytes": ("MOLMO_MAX_IMAGE_BYTES", "Largest image file accepted, in bytes"),
    "max_image_pixels": (
        "MOLMO_MAX_IMAGE_PIXELS",
        "Largest image accepted, in pixels (decompression-bomb guard)",
    ),
    "allowed_hosts": (
        "MOLMO_ALLOWED_HOSTS",
        "Comma-separated host names (`name` or `name:port`), "
        "IPs and CIDRs images may be fetched from besides Label Studio's; `*`: any "
        "host at a public address. Loopback, private, link-local... addresses only "
        "when listed (docs/security.md)",
    ),
    "local_files_root": (
        "LOCAL_FILES_DOCUMENT_ROOT",
        "Folder served by Label Studio's local-files storage, read directly when set",
    ),
    "host": ("HOST", "Address the server binds"),
    "port": ("PORT", "Port the server binds"),
    "threads": ("THREADS", "HTTP threads of the single gunicorn worker"),
    "basic_auth_user": ("BASIC_AUTH_USER", "Require HTTP basic auth with this user"),
    "basic_auth_pass": ("BASIC_AUTH_PASS", "... and this password"),
    "max_request_bytes": ("MOLMO_MAX_REQUEST_BYTES", "Largest request body accepted"),
    "log_level": ("LOG_LEVEL", "DEBUG, INFO, WARNING or ERROR"),
    "log_format": ("LOG_FORMAT", "`json` (one object a line) or `text`"),
}
ENV_NAMES = {name: var for name, (var, _) in SETTINGS_DOC.items()}


def _convert(name: str, var: str, raw: str):
    kind = {f.name: f.type for f in fields(Settings)}[name]
    try:
        if kind in ("int", "int | None"):
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind in ("Path", "Path | None"):
            return Path(raw)
        if kind == "tuple[str, ...]":
            return tuple(h.strip().lower() for h in raw.split(",") if h.strip())
    except ValueError as exc:
        raise SettingsError(f"{var}={raw!r} is not a valid {kind}") from exc
    return raw

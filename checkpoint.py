"""Checkpoints: a run's weights, optimizer state and config on disk, and back.

A checkpoint folder is one that Hugging Face `transformers` opens as it is
(`LlamaForCausalLM.from_pretrained(DIR)`, and `AutoTokenizer.from_pretrained(DIR)` with the
tokenizer.json train.py adds):
  model.safetensors      fp32 weights, HF names and layouts, no lm_head.weight (tied)
  config.json            HF LlamaConfig fields
  optimizer.safetensors  AdamW's m and v ("m.<name>", "v.<name>"), its settings in the metadata
train.py adds tokenizer.json, trainer_state.json and final_model.json as extra_files: every
file of a save belongs to the one checkpoint.

1. Saving: a checkpoint is committed as one unit, or not at all

No file system renames several files at once. So a save (commit_files) goes in three moves,
Orbax's directory rename as the commit plus a redo log to finish it:

  1. stage    write every file into DIR/.saving/ and flush it to disk. DIR's own files are not
              touched: a kill, a full disk or a Ctrl-C here leaves the previous checkpoint as
              it was (and a .saving/ that the next start deletes).
  2. commit   rename .saving/ to DIR/.committed/: one atomic rename. From this instant the new
              checkpoint is the one that counts.
  3. move in  rename each file of .committed/ over its namesake in DIR, then remove the empty
              .committed/. A kill here leaves DIR half old, half new, and the rest of the new
              files in .committed/: the next start moves them in.

recover(DIR) does both clean-ups: it finishes a committed save and deletes an uncommitted one
(and temporary files a kill left). lock(DIR), which train.py holds on its run folder for the
whole run, runs it first. So a run always starts from the last committed checkpoint, with
nothing left over, in the plain layout above. A reader that does not lock (transformers,
sample.py) may meet a folder in the middle of step 3 (live, or cut short by a kill): its
model.safetensors is then the one checkpoint's or the other's, whole, and its config.json and
tokenizer.json are the same in both.

Why this design rather than llm.c's DONE_<step> marker or the HF Trainer's checkpoint-<N>/
folders: those keep a folder per step, and DIR itself would no longer be the model that
transformers opens (it would need a pointer to the latest one, a symlink, which not every file
system, copy or upload keeps). Here DIR stays the model, and the commit costs one rename. The
price, as for any checkpoint that is never overwritten in place: a save needs room for two.

2. Loading: every file is checked before it is used

One check per file type, each a one-line CheckpointError naming the file and the field:
read_json (a readable JSON file), config_from_hf (config.json: each field's type and range),
read_safetensors_header (a .safetensors header: names, dtypes, shapes and offsets against the
file's size). load_config also checks config.json against model.safetensors' header before
anything it sizes is built: num_hidden_layers 10**7 is refused at once, not after gigabytes.
"""
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil

import numpy as np

import albor
from albor import Config, param_shapes, to_numpy, xp

try:
    import fcntl  # POSIX: lock() uses flock
except ImportError:  # Windows: no folder lock
    fcntl = None

CHECKPOINT_MODEL = "model.safetensors"
CHECKPOINT_CONFIG = "config.json"
CHECKPOINT_OPTIMIZER = "optimizer.safetensors"
SAVING = ".saving"        # a save being staged (step 1)
COMMITTED = ".committed"  # a committed save being moved in (step 3)
MAX_HEADER_BYTES = 100_000_000   # the safetensors library's own limit on a header
MAX_CONFIG_SIZE = 2**31 - 1      # the largest size config.json may give (int32, as HF's kernels)


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt or does not fit the model."""


# -----------------------------------------------------------------------------
# config.json


def config_to_hf(config):
    """The config.json dict Hugging Face's LlamaConfig reads."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_position_embeddings,
        "rope_theta": config.rope_theta,
        "rope_scaling": None,
        "rms_norm_eps": config.rms_norm_eps,
        "hidden_act": "silu",
        "tie_word_embeddings": True,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "bos_token_id": 256,
        "eos_token_id": 256,
        "pad_token_id": 257,
        "torch_dtype": "float32",
    }


def config_from_hf(hf, source="config.json"):
    """A Config from a config.json dict; a CheckpointError naming `source` and the field if it is
    not one albor can run. Sizes must be ints in [1, MAX_CONFIG_SIZE], rope_theta and
    rms_norm_eps finite numbers > 0."""
    if not isinstance(hf, dict):
        raise CheckpointError(f"{source}: expected a JSON object, got {type(hf).__name__}")
    if hf.get("model_type", "llama") != "llama":
        raise CheckpointError(f"{source}: model_type is {_short(hf.get('model_type'))}, "
                              "albor reads only 'llama'")
    for key, wanted in (("tie_word_embeddings", True), ("hidden_act", "silu"),
                        ("attention_bias", False), ("mlp_bias", False)):
        if key in hf and hf[key] != wanted:
            raise CheckpointError(f"{source}: {key} is {_short(hf[key])}, albor needs {wanted!r}")
    if hf.get("rope_scaling") is not None:
        raise CheckpointError(f"{source}: rope_scaling {_short(hf['rope_scaling'])} is not supported")
    values = {}
    for field in dataclasses.fields(Config):
        if field.name not in hf:
            raise CheckpointError(f"{source}: missing the field {field.name!r}")
        values[field.name] = _config_value(field.name, field.type in (float, "float"), hf[field.name], source)
    try:
        config = Config(**values)
    except ValueError as e:   # sizes that do not fit together, e.g. heads that do not divide
        raise CheckpointError(f"{source}: {e}") from None
    if "head_dim" in hf and hf["head_dim"] != config.head_dim:
        raise CheckpointError(f"{source}: head_dim {_short(hf['head_dim'])} != hidden_size / "
                              f"num_attention_heads = {config.head_dim}")
    return config


def _config_value(name, is_float, value, source):
    """One config.json field's value, checked: a finite float > 0, or an int size."""
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if is_float:
        try:
            number = float(value) if is_number else math.nan
        except OverflowError:   # an int too large for a float
            number = math.inf
        if not (math.isfinite(number) and number > 0):
            raise CheckpointError(f"{source}: {name} must be a finite number > 0, got {_short(value)}")
        return number
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not (is_number and isinstance(value, int) and 1 <= value <= MAX_CONFIG_SIZE):
        raise CheckpointError(f"{source}: {name} must be an int in [1, {MAX_CONFIG_SIZE}], "
                              f"got {_short(value)}")
    return value


def _short(value):
    """repr(value), cut to fit in a one-line message."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def read_json(path, what="JSON"):
    """The JSON value in the file at path; a one-line CheckpointError naming the file (and `what`
    it should hold) if it is missing, unreadable, not UTF-8 or not JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found ({what})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read {what}: {e.strerror or e}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:   # RecursionError: '[' * 10**6
        reason = "nested too deeply" if isinstance(e, RecursionError) else str(e).splitlines()[0]
        raise CheckpointError(f"{path}: not valid JSON ({what}): {reason}") from None


# -----------------------------------------------------------------------------
# Saving: stage, commit, move in (module docstring)


def save_checkpoint(folder, config, params, optimizer=None, step=0, extra_files=None):
    """Save the model, the optimizer state and extra_files ({file name: bytes}) into folder as one
    committed checkpoint (commit_files). The previous checkpoint there stays whole until this one
    is committed."""
    if set(params) != set(param_shapes(config)):
        raise CheckpointError(f"{folder}: params do not match the config's parameter names")
    files = {CHECKPOINT_MODEL: lambda path: write_safetensors(path, params, model_metadata(step)),
             CHECKPOINT_CONFIG: (json.dumps(config_to_hf(config), indent=2) + "\n").encode()}
    if optimizer is not None:
        metadata = {"step": step, "hyperparameters": json.dumps(optimizer.hyperparameters())}
        files[CHECKPOINT_OPTIMIZER] = lambda path: write_safetensors(path, optimizer.state_tensors(),
                                                                     metadata)
    files.update(extra_files or {})
    commit_files(folder, files)


def commit_files(folder, files):
    """Write files ({name: bytes, or a function that writes the file at the path it is given})
    into folder as one unit: stage, commit, move in. Files of folder not named keep theirs.

    A failure while staging (a full disk, say, as a one-line CheckpointError, or a Ctrl-C)
    leaves folder as it was.
    """
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    recover(folder)
    for name in files:
        if os.path.basename(name) != name or name.startswith("."):
            raise ValueError(f"{name!r}: a checkpoint file is a plain name in the folder")
        if os.path.isdir(os.path.join(folder, name)):
            raise CheckpointError(f"{os.path.join(folder, name)}: a folder is in the place of this file")
    staging = os.path.join(folder, SAVING)
    try:
        os.mkdir(staging)
        for name, data in files.items():
            if callable(data):
                data(os.path.join(staging, name))
            else:
                _write_bytes(os.path.join(staging, name), data)
        _fsync_folder(staging)
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        reason = e.strerror or str(e)
        raise CheckpointError(f"{folder}: cannot save ({reason}); nothing in it was changed") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    os.rename(staging, os.path.join(folder, COMMITTED))   # the commit
    _fsync_folder(folder)
    _move_in(folder)


def _move_in(folder):
    """Step 3: each file of folder/.committed/ over its namesake in folder; then .committed/ goes.
    Running it again after a kill finishes what is left."""
    committed = os.path.join(folder, COMMITTED)
    for name in sorted(os.listdir(committed)):
        os.replace(os.path.join(committed, name), os.path.join(folder, name))
    _fsync_folder(folder)
    os.rmdir(committed)


def recover(folder):
    """Finish a committed save that a kill cut short, delete one that was not committed, and the
    temporary files of atomic_write_bytes a kill left. Call it only where no other process writes
    the folder (lock() does)."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return
    if os.path.isdir(os.path.join(folder, COMMITTED)):
        _move_in(folder)
    shutil.rmtree(os.path.join(folder, SAVING), ignore_errors=True)
    for name in os.listdir(folder):
        if name.startswith(".") and name.endswith(".tmp") and os.path.isfile(os.path.join(folder, name)):
            os.remove(os.path.join(folder, name))


def holds_checkpoint(folder):
    """Whether folder holds (or is moving in) a checkpoint of a train.py run."""
    return any(os.path.exists(os.path.join(folder, name))
               for name in (CHECKPOINT_MODEL, CHECKPOINT_OPTIMIZER, "trainer_state.json", COMMITTED))


@contextlib.contextmanager
def lock(folder):
    """Hold folder's lock while the block runs, so that no second process writes it meanwhile;
    recover(folder) first. A CheckpointError if another process holds it.

    The lock is an flock on the folder itself: the kernel lets go of it when the process ends,
    however it ends (a SIGKILL too), so a lock is never stale and leaves no file behind.
    (Without flock, on Windows or a file system that refuses it, the folder is not locked.)
    """
    folder = os.fspath(folder)
    fd = None
    if fcntl is not None:
        try:
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as e:
            raise CheckpointError(f"{folder}: cannot open the folder ({e.strerror or e})") from None
    try:
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise CheckpointError(f"{folder} is in use by another run (it holds the folder's lock): "
                                      "wait for it to end, or use another folder") from None
            except OSError:
                pass   # this file system has no flock
        recover(folder)
        yield
    finally:
        if fd is not None:
            os.close(fd)   # lets go of the lock


def atomic_write_bytes(path, data):
    """Write bytes to path atomically: a temporary file in the same folder, fsync, rename."""
    path = os.fspath(path)
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
    try:
        _write_bytes(tmp, data)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, path)


def safetensors_parts(tensors, metadata):
    """The bytes of a safetensors file of float32 tensors, in order, as pieces (bytes or
    memoryviews): write_safetensors writes them, safetensors_digest hashes them.

    The format is simple enough to write by hand (and so the bytes are the same on every run,
    which the library, storing the metadata in a hash map, does not promise):
        8 bytes   N, the header's length, little-endian
        N bytes   JSON: {"__metadata__": {str: str}, name: {"dtype": "F32", "shape": [...],
                  "data_offsets": [begin, end]}, ...}, padded with spaces to a multiple of 8
        the raw little-endian data of each tensor, back to back, at those offsets
    """
    host = {name: np.ascontiguousarray(to_numpy(a), dtype="<f4") for name, a in tensors.items()}
    header = {"__metadata__": {key: str(value) for key, value in metadata.items()}}
    offset = 0
    for name, a in host.items():
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)
    return [len(header_bytes).to_bytes(8, "little"), header_bytes] + [a.data for a in host.values()]


def write_safetensors(path, tensors, metadata):
    """Write float32 tensors to the file at path in the safetensors format, and flush it to disk."""
    with open(path, "wb") as f:
        for part in safetensors_parts(tensors, metadata):
            f.write(part)
        f.flush()
        os.fsync(f.fileno())


def safetensors_digest(tensors, metadata):
    """(SHA-256 hex digest, size in bytes) of the file write_safetensors would write, unwritten."""
    digest, size = hashlib.sha256(), 0
    for part in safetensors_parts(tensors, metadata):
        digest.update(part)
        size += len(part) if isinstance(part, bytes) else part.nbytes
    return digest.hexdigest(), size


def model_metadata(step):
    """model.safetensors' metadata: "format": "pt" (which transformers expects) and the step."""
    return {"format": "pt", "step": step}


def _write_bytes(path, data):
    """Write bytes to the file at path and flush it to disk."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_folder(folder):
    """Flush a folder's entries (the names created or renamed in it) to disk (POSIX only)."""
    if hasattr(os, "O_DIRECTORY"):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# -----------------------------------------------------------------------------
# Loading, each file checked first


def read_safetensors_header(f, path):
    """The checked header of the open .safetensors file f: ({name: (shape, data offset)} in the
    order of the data, metadata {str: str}).

    What write_safetensors writes, and nothing else: the 8-byte length, a JSON object whose
    entries are {"dtype": "F32", "shape": [ints >= 0], "data_offsets": [begin, end]} with
    end - begin = 4 bytes x the shape's size, the data back to back, filling the rest of the file.
    """
    size = os.fstat(f.fileno()).st_size
    prefix = f.read(8)
    if len(prefix) < 8:
        raise CheckpointError(f"{path}: truncated ({size} bytes, not even a safetensors header)")
    header_len = int.from_bytes(prefix, "little")
    if 8 + header_len > size:
        raise CheckpointError(f"{path}: truncated or not a safetensors file "
                              f"(header says {header_len} header bytes, file has {size} bytes)")
    if header_len > MAX_HEADER_BYTES:
        raise CheckpointError(f"{path}: corrupt safetensors header ({header_len} bytes long)")
    try:
        header = json.loads(f.read(header_len))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise CheckpointError(f"{path}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: corrupt safetensors header "
                              "(__metadata__ is not an object of strings)")
    entries = sorted(_tensor_entry(name, entry, path) + (name,) for name, entry in header.items())
    tensors, end = {}, 0
    for begin, stop, shape, name in entries:
        if begin != end:
            raise CheckpointError(f"{path}: corrupt safetensors header (the data of {name!r} "
                                  f"starts at {begin}, not at {end})")
        tensors[name], end = (shape, begin), stop
    if 8 + header_len + end != size:
        raise CheckpointError(f"{path}: truncated or padded: the header describes "
                              f"{8 + header_len + end} bytes, the file has {size}")
    return tensors, metadata


def _tensor_entry(name, entry, path):
    """(begin, end, shape) of one tensor of a safetensors header, checked."""
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise CheckpointError(f"{where}: corrupt header entry (needs dtype, shape and data_offsets)")
    if entry["dtype"] != "F32":
        raise CheckpointError(f"{where} is {_short(entry['dtype'])}, albor reads only float32 (F32)")
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not (isinstance(shape, list) and all(_is_int(n) and n >= 0 for n in shape)):
        raise CheckpointError(f"{where}: shape {_short(shape)} is not a list of sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(n) and n >= 0 for n in offsets)
            and offsets[1] - offsets[0] == 4 * math.prod(shape)):
        raise CheckpointError(f"{where}: data_offsets {_short(offsets)} do not fit its shape {shape}")
    return offsets[0], offsets[1], tuple(shape)


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _check_tensors(tensors, expected_shapes, path):
    """The header's tensors ({name: (shape, offset)}) are exactly the expected {name: shape};
    the errors start with path."""
    missing = [name for name in expected_shapes if name not in tensors]
    if missing:
        raise CheckpointError(f"{path}: missing {len(missing)} tensor(s), first {missing[0]!r}")
    extra = [name for name in tensors if name not in expected_shapes]
    if extra:
        raise CheckpointError(f"{path}: unexpected tensor {extra[0]!r} ({len(extra)} in all)")
    for name, shape in expected_shapes.items():
        if tensors[name][0] != tuple(shape):
            raise CheckpointError(f"{path}: {name} has shape {tensors[name][0]}, "
                                  f"the config needs {tuple(shape)}")


def _open(path):
    """path opened for reading; a one-line CheckpointError if it cannot be."""
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e.strerror or e})") from None


def read_safetensors(path, expected_shapes=None):
    """Load a .safetensors file as ({name: float32 np.ndarray}, metadata), its header checked first
    (read_safetensors_header) and, given expected_shapes ({name: shape}), its names and shapes
    too, before any tensor is read. One-line CheckpointErrors name the file."""
    path = os.fspath(path)
    with _open(path) as f:
        tensors, metadata = read_safetensors_header(f, path)
        if expected_shapes is not None:
            _check_tensors(tensors, expected_shapes, path)
        data_start = f.tell()
        arrays = {}
        for name, (shape, offset) in tensors.items():
            arrays[name] = np.empty(shape, dtype="<f4")
            f.seek(data_start + offset)
            if f.readinto(arrays[name].reshape(-1).view(np.uint8)) != arrays[name].nbytes:
                raise CheckpointError(f"{path}: truncated while reading {name}")
    return arrays, metadata


def metadata_step(metadata, path):
    """The "step" a .safetensors file's metadata records (0 if none), checked."""
    step = metadata.get("step", "0")
    if not (step.isascii() and step.isdigit() and len(step) < 19):
        raise CheckpointError(f"{path}: metadata step is {_short(step)}, not a step number")
    return int(step)


def load_config(folder):
    """The Config of a checkpoint folder: its config.json, checked field by field and against
    model.safetensors' header (the tensors' names and shapes), so no size in config.json is used
    before the weights file has confirmed it."""
    folder = os.fspath(folder)
    path = os.path.join(folder, CHECKPOINT_CONFIG)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: file not found (is {folder!r} a checkpoint folder?)")
    config = config_from_hf(read_json(path, "the model's config"), source=path)
    model_path = os.path.join(folder, CHECKPOINT_MODEL)
    with _open(model_path) as f:
        tensors, _ = read_safetensors_header(f, model_path)
    if config.num_hidden_layers > len(tensors):   # param_shapes would list more tensors than there are
        raise CheckpointError(f"{path}: num_hidden_layers {config.num_hidden_layers} does not fit "
                              f"{model_path}, which holds {len(tensors)} tensors")
    _check_tensors(tensors, param_shapes(config), f"{path} does not fit {model_path}")
    return config


def load_checkpoint(folder):
    """Load (config, params, step) from a checkpoint folder; params are float32 arrays on xp."""
    config = load_config(folder)
    path = os.path.join(os.fspath(folder), CHECKPOINT_MODEL)
    tensors, metadata = read_safetensors(path, param_shapes(config))
    params = {name: xp.asarray(tensors[name]) for name in param_shapes(config)}   # data-flow order
    return config, params, metadata_step(metadata, path)


def load_optimizer(folder, params, step=None, optimizer_class=albor.AdamW):
    """An AdamW (of optimizer_class: train.py's is cpu.FastAdamW) restored from folder's
    optimizer.safetensors, for these params.

    Given step (the model file's step), checks the optimizer state belongs to it.
    """
    path = os.path.join(os.fspath(folder), CHECKPOINT_OPTIMIZER)
    shapes = {}
    for name, p in params.items():
        shapes["m." + name] = p.shape
        shapes["v." + name] = p.shape
    tensors, metadata = read_safetensors(path, shapes)
    saved_step = metadata_step(metadata, path) if "step" in metadata else None
    if step is not None and saved_step != step:
        raise CheckpointError(f"{path}: saved at step {saved_step}, but the model file is "
                              f"at step {step} (an interrupted save?)")
    try:
        hyper = json.loads(metadata["hyperparameters"])
        betas, eps, weight_decay, t = hyper["betas"], hyper["eps"], hyper["weight_decay"], hyper["t"]
        if not (isinstance(betas, list) and len(betas) == 2 and _is_int(t) and t >= 0):
            raise ValueError
        optimizer = optimizer_class(params, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
    except (KeyError, TypeError, ValueError, RecursionError):
        raise CheckpointError(f"{path}: missing or corrupt optimizer settings in the metadata") from None
    optimizer.t = t
    for name in params:
        optimizer.m[name] = xp.asarray(tensors["m." + name])
        optimizer.v[name] = xp.asarray(tensors["v." + name])
    return optimizer

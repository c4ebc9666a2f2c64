"""Checkpoints: a run's weights, optimizer state and config on disk, and back.

A checkpoint folder is one that Hugging Face `transformers` opens as LlamaForCausalLM:
  model.safetensors      fp32 weights, HF names and layouts, no lm_head.weight (tied)
  config.json            HF LlamaConfig fields
  optimizer.safetensors  AdamW's m and v ("m.<name>", "v.<name>"), its settings in the metadata
train.py adds tokenizer.json, trainer_state.json and final_model.json.

Writes are atomic: every file is written to a hidden temporary name in the same folder,
flushed to disk, and only then renamed over the old one (os.replace is atomic on POSIX and
Windows). A crash mid-save leaves the previous files intact. The model and optimizer files
both record the step they belong to, and loading checks that they agree.
"""
import dataclasses
import hashlib
import json
import os

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file as _safetensors_load_file

import albor
from albor import Config, param_shapes, to_numpy, xp

CHECKPOINT_MODEL = "model.safetensors"
CHECKPOINT_CONFIG = "config.json"
CHECKPOINT_OPTIMIZER = "optimizer.safetensors"


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt or does not fit the model."""


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
    """A Config from a config.json dict; a CheckpointError naming `source` if it is not one albor can run."""
    if not isinstance(hf, dict):
        raise CheckpointError(f"{source}: expected a JSON object, got {type(hf).__name__}")
    if hf.get("model_type", "llama") != "llama":
        raise CheckpointError(f"{source}: model_type is {hf.get('model_type')!r}, albor reads only 'llama'")
    for key, wanted in (("tie_word_embeddings", True), ("hidden_act", "silu"),
                        ("attention_bias", False), ("mlp_bias", False)):
        if key in hf and hf[key] != wanted:
            raise CheckpointError(f"{source}: {key} is {hf[key]!r}, albor needs {wanted!r}")
    if hf.get("rope_scaling") is not None:
        raise CheckpointError(f"{source}: rope_scaling {hf['rope_scaling']!r} is not supported")
    values = {}
    for field in dataclasses.fields(Config):
        if field.name not in hf:
            raise CheckpointError(f"{source}: missing the field {field.name!r}")
        kind = float if field.type in (float, "float") else int
        value = hf[field.name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
            raise CheckpointError(f"{source}: {field.name} must be a {kind.__name__}, got {value!r}")
        values[field.name] = kind(value)
    config = Config(**values)
    if "head_dim" in hf and hf["head_dim"] != config.head_dim:
        raise CheckpointError(f"{source}: head_dim {hf['head_dim']} != hidden_size / num_attention_heads "
                              f"= {config.head_dim}")
    return config


def atomic_write_bytes(path, data):
    """Write bytes to path atomically: a temporary file in the same folder, fsync, rename."""
    path = os.fspath(path)
    tmp = _temporary_name(path)
    try:
        _write_bytes(tmp, data)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, path)


def _temporary_name(path):
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.{os.getpid()}.tmp")


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


def write_safetensors(tmp, tensors, metadata):
    """Write float32 tensors to the file tmp in the safetensors format, and flush it to disk."""
    with open(tmp, "wb") as f:
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


def _write_bytes(tmp, data):
    """Write bytes to the file tmp and flush it to disk."""
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(folder, config, params, optimizer=None, step=0, extra_files=None):
    """Save the model (and the optimizer state, and any extra files) into folder, atomically.

    extra_files: {file name: bytes} written in the same go (train.py's
    tokenizer.json, trainer_state.json, ...). All files are staged under
    temporary names first and renamed into place only when all are on disk.
    """
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    shapes = param_shapes(config)
    if set(params) != set(shapes):
        raise CheckpointError(f"{folder}: params do not match the config's parameter names")
    files = [(CHECKPOINT_MODEL, write_safetensors, (params, model_metadata(step))),
             (CHECKPOINT_CONFIG, _write_bytes, ((json.dumps(config_to_hf(config), indent=2) + "\n").encode(),))]
    if optimizer is not None:
        metadata = {"step": step, "hyperparameters": json.dumps(optimizer.hyperparameters())}
        files.append((CHECKPOINT_OPTIMIZER, write_safetensors, (optimizer.state_tensors(), metadata)))
    for name, data in (extra_files or {}).items():
        files.append((name, _write_bytes, (data,)))
    staged = []   # (temporary path, final path)
    try:
        for name, write, args in files:
            path = os.path.join(folder, name)
            staged.append((_temporary_name(path), path))
            write(staged[-1][0], *args)
    except BaseException:            # a crash or Ctrl-C mid-save: drop the staged files, keep the old ones
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.remove(tmp)
        raise
    for tmp, path in staged:
        os.replace(tmp, path)
    if hasattr(os, "O_DIRECTORY"):   # make the renames themselves durable
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def read_safetensors(path, expected_shapes=None):
    """Load a .safetensors file as ({name: np.ndarray}, metadata), checking it first.

    Raises a one-line CheckpointError naming the file for a missing, truncated
    or corrupt file, and, given expected_shapes ({name: shape}), for missing,
    unexpected, wrongly shaped or non-float32 tensors.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: file not found")
    size = os.path.getsize(path)
    # Layout: 8-byte little-endian header length N, N bytes of JSON header, then the raw data.
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: truncated ({size} bytes, not even a safetensors header)")
        header_len = int.from_bytes(prefix, "little")
        if 8 + header_len > size:
            raise CheckpointError(f"{path}: truncated or not a safetensors file "
                                  f"(header says {header_len} header bytes, file has {size} bytes)")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(f"{path}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_len = max([entry["data_offsets"][1] for name, entry in header.items()
                    if name != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry] or [0])
    if 8 + header_len + data_len != size:
        raise CheckpointError(f"{path}: truncated or padded: the header describes "
                              f"{8 + header_len + data_len} bytes, the file has {size}")
    try:
        tensors = _safetensors_load_file(path)
    except (SafetensorError, ValueError, OSError) as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: corrupt safetensors file ({message})") from None
    metadata = header.get("__metadata__") or {}
    if expected_shapes is not None:
        missing = [name for name in expected_shapes if name not in tensors]
        if missing:
            raise CheckpointError(f"{path}: missing {len(missing)} tensor(s), first {missing[0]!r}")
        extra = [name for name in tensors if name not in expected_shapes]
        if extra:
            raise CheckpointError(f"{path}: unexpected tensor {extra[0]!r} ({len(extra)} in all)")
        for name, shape in expected_shapes.items():
            if tuple(tensors[name].shape) != tuple(shape):
                raise CheckpointError(f"{path}: {name} has shape {tuple(tensors[name].shape)}, "
                                      f"the config needs {tuple(shape)}")
            if tensors[name].dtype != np.float32:
                raise CheckpointError(f"{path}: {name} is {tensors[name].dtype}, expected float32")
    return tensors, metadata


def load_config(folder):
    """The Config of a checkpoint folder, from its config.json."""
    path = os.path.join(os.fspath(folder), CHECKPOINT_CONFIG)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: file not found (is {os.fspath(folder)!r} a checkpoint folder?)")
    try:
        with open(path, encoding="utf-8") as f:
            hf = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    return config_from_hf(hf, source=path)


def load_checkpoint(folder):
    """Load (config, params, step) from a checkpoint folder; params are float32 arrays on xp."""
    config = load_config(folder)
    path = os.path.join(os.fspath(folder), CHECKPOINT_MODEL)
    tensors, metadata = read_safetensors(path, param_shapes(config))
    params = {name: xp.asarray(tensors[name]) for name in param_shapes(config)}   # data-flow order
    return config, params, int(metadata.get("step", 0))


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
    if step is not None and int(metadata.get("step", -1)) != step:
        raise CheckpointError(f"{path}: saved at step {metadata.get('step')}, but the model file is "
                              f"at step {step} (an interrupted save?)")
    try:
        hyper = json.loads(metadata["hyperparameters"])
        optimizer = optimizer_class(params, betas=tuple(hyper["betas"]), eps=hyper["eps"],
                                    weight_decay=hyper["weight_decay"])
        optimizer.t = int(hyper["t"])
    except (KeyError, TypeError, ValueError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: missing or corrupt optimizer settings in the metadata") from None
    for name in params:
        optimizer.m[name] = xp.asarray(tensors["m." + name])
        optimizer.v[name] = xp.asarray(tensors["v." + name])
    return optimizer

"""Checkpoints: one .npz of named float arrays plus metadata, never pickled, written to a
temporary file and renamed so that a kill never leaves a broken file."""
from __future__ import annotations

import os
import tempfile
import zipfile

import numpy as np

from .errors import FlowError

META = "__meta__."


def sweep_temp(d):
    """Remove the temporary files that killed runs left in folder d (".tmp-<pid>-*.npz" whose
    process is gone). Files of a live process (this one included), and anything else, stay."""
    try:
        names = os.listdir(d)
    except OSError:
        return
    for name in names:
        parts = name.split("-")
        if not (name.startswith(".tmp-") and name.endswith(".npz") and len(parts) >= 3 and parts[1].isdigit()):
            continue
        try:
            os.kill(int(parts[1]), 0)
            continue          # alive (or not ours to signal): keep
        except ProcessLookupError:
            pass
        except (OverflowError, OSError):
            continue
        try:
            os.remove(os.path.join(d, name))
        except OSError:
            pass


def save(net, path, extra: dict):
    arrays = {f"param.{k}": np.asarray(v) for k, v in net.named_params().items()}
    arrays.update({f"state.{k}": np.asarray(v) for k, v in net.named_state().items()})
    arrays[META + "source"] = np.array(str(net.model))
    if getattr(net.model, "file", None):
        arrays[META + "name"] = np.array(os.path.splitext(os.path.basename(net.model.file))[0])
    for k, v in extra.items():
        arrays[k] = np.asarray(v)
    d = os.path.dirname(os.path.abspath(path)) or "."
    try:
        os.makedirs(d, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".tmp-{os.getpid()}-", suffix=".npz", dir=d)
    except OSError as e:
        raise FlowError(f"cannot write a checkpoint in {d}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp makes 0600; a checkpoint is an ordinary file
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        kept = "; the previous checkpoint there is kept" if os.path.exists(path) else ""
        raise FlowError(f"cannot write checkpoint {path}: {e.strerror or e}{kept}") from None
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


def read(path) -> dict:
    """All arrays of a checkpoint, refusing pickled content; FlowError on any problem."""
    try:
        with open(path, "rb") as f:
            head = f.read(6)
    except FileNotFoundError:
        raise FlowError(f"no such checkpoint: {path}") from None
    except IsADirectoryError:
        raise FlowError(f"{path} is a directory, not a checkpoint") from None
    except OSError as e:
        raise FlowError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    if head[:1] == b"\x80":
        raise FlowError(f"{path}: refusing a checkpoint with pickled content (a Python pickle)")
    if head == b"\x93NUMPY":
        raise FlowError(f"{path}: a single array (.npy), not a flowdsl checkpoint (.npz)")
    if head[:2] != b"PK":
        raise FlowError(f"{path}: not a flowdsl checkpoint (not an .npz archive)"
                        + (" (the file is empty)" if not head else ""))
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise FlowError(f"no such checkpoint: {path}") from None
    except ValueError as e:
        if "pickle" in str(e).lower():
            raise FlowError(f"{path}: refusing a checkpoint with pickled content") from None
        raise FlowError(f"{path}: not a flowdsl checkpoint ({e})") from None
    except (zipfile.BadZipFile, OSError, EOFError, KeyError) as e:
        raise FlowError(f"{path}: unreadable or truncated checkpoint ({type(e).__name__})") from None


def _other_model(path, data, net, detail):
    """The error for a checkpoint of another model: which model it came from, if it says."""
    ours = f"{net.model.n_params():,} weights"
    name = str(data[META + "name"]) if META + "name" in data else None
    theirs = sum(int(np.prod(v.shape)) for k, v in data.items() if k.startswith("param."))
    what = f"'{name}' ({theirs:,} weights)" if name else f"another model ({theirs:,} weights)"
    src = str(data[META + "source"]).strip() if META + "source" in data else ""
    first = f"; its network begins: {src.splitlines()[0][:100]}" if src else ""
    return FlowError(f"{path} was trained for {what}, not this model ({ours}): {detail}{first}. "
                     f"Pass the checkpoint of this model's own run (runs/<model name>/best.npz)")


def load_into(net, path, data=None) -> dict:
    """Load the checkpoint at path (or its arrays `data`, already read) into net; returns them."""
    data = read(path) if data is None else data
    params = net.named_params()
    for k, dst in params.items():
        key = f"param.{k}"
        if key not in data:
            raise _other_model(path, data, net, f"it has no parameter '{k}'")
        src = data[key]
        if src.shape != dst.shape:
            raise _other_model(path, data, net, f"parameter '{k}' has shape {src.shape} there but {dst.shape} here")
        if not np.issubdtype(src.dtype, np.floating):
            raise FlowError(f"{path}: parameter '{k}' is not floating point ({src.dtype})")
    extra = [k[6:] for k in data if k.startswith("param.") and k[6:] not in params]
    if extra:
        raise _other_model(path, data, net, f"it has parameter '{extra[0]}', which this model does not")
    for k, dst in params.items():
        dst[...] = data[f"param.{k}"]
    for k, dst in net.named_state().items():
        if f"state.{k}" in data and data[f"state.{k}"].shape == dst.shape:
            dst[...] = data[f"state.{k}"]
    return data

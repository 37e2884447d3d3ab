"""Atomic checkpoints: written to a temporary file in the same folder, then renamed.

A crash mid-write leaves the previous checkpoint intact. Files load with
``torch.load(weights_only=True)``, so a checkpoint received from elsewhere cannot run code;
everything stored is therefore tensors and plain Python values.
"""

from __future__ import annotations

import math
import pickle
import random
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedmoco.atomic import atomic_write
from fedmoco.config import IMAGE_SIZES
from fedmoco.errors import CheckpointError

FORMAT = "fedmoco-checkpoint"
VERSION = 1


def atomic_save(obj: Any, path: Path | str) -> Path:
    """``torch.save`` ``obj`` to ``path`` atomically (temp file + fsync + rename)."""
    return atomic_write(path, lambda fh: torch.save(obj, fh))


def load_checkpoint(path: Path | str) -> dict[str, Any]:
    """Load a fedmoco checkpoint; CheckpointError naming the file if it is not one."""
    path = Path(path)
    if path.is_dir():
        inside = [name for name in ("checkpoint.pt", "encoder.pt") if (path / name).is_file()]
        hint = f"; did you mean {path / inside[0]}?" if inside else ""
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file{hint}")
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint does not exist")
    ckpt = read_torch_file(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a fedmoco checkpoint{_what_else(ckpt)}")
    if ckpt.get("version", 0) > VERSION:
        raise CheckpointError(f"{path}: checkpoint version {ckpt['version']} is newer than this fedmoco")
    problem = record_problem(ckpt)
    if problem:
        raise CheckpointError(f"{path}: not a usable fedmoco checkpoint: {problem}")
    return ckpt


def _other_files() -> dict[str, str]:
    """fedmoco's other files by format tag (their owners' constants): what each is, and the file
    to give instead. The server's tag is spelt here: the core never imports server/."""
    from fedmoco.finetune import FINETUNED_FORMAT
    from fedmoco.ledger import LEDGER_FORMAT
    from fedmoco.privacy import LEDGER_FORMAT as KEY_LEDGER_FORMAT

    return {
        "fedmoco-server-state": "a federation's resume state; give encoder.pt beside it",
        FINETUNED_FORMAT: "a fine-tuned classifier (fedmoco finetune's model.pt); give the checkpoint it was "
                          "fine-tuned from",
        "fedmoco-linear-probe": "a linear probe (linear-probe.pt); give the checkpoint it was trained on",
        LEDGER_FORMAT: "a site's privacy ledger",
        KEY_LEDGER_FORMAT: "a site's privacy ledger",
    }


def _what_else(obj: Any) -> str:
    """``: <what it is>`` for a file fedmoco wrote that is not a checkpoint (a user gave
    server-state.pt, model.pt or an export's backbone.pt: all were 'not a fedmoco checkpoint',
    with no pointer to the right file), else ``""``."""
    tag = obj.get("format") if isinstance(obj, dict) else None
    if isinstance(tag, str) and tag in (known := _other_files()):
        return f": {known[tag]}"
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return (": a plain state_dict (an export's backbone.pt?); give the checkpoint it was exported from, "
                "or load it into torchvision")
    return ""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _numbers(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)


def record_problem(ckpt: dict[str, Any]) -> str | None:
    """What is wrong with the fields a checkpoint's readers index, or None. A file with the
    format tag and other contents (edited, or written by another tool) reached the evaluation
    commands and ``--resume`` and ended in KeyError / TypeError tracebacks."""
    if not isinstance(ckpt.get("moco_config"), dict):
        return "'moco_config' is missing or not a mapping"
    model = ckpt.get("model")
    if not isinstance(model, dict) or not model or not all(isinstance(v, torch.Tensor) for v in model.values()):
        return "'model' is missing or not a mapping of tensors"
    data = ckpt.get("data")
    if not isinstance(data, dict):
        return "'data' is missing or not a mapping"
    if not isinstance(data.get("domain"), str):
        return "data 'domain' is missing or not a name"
    size, (lo, hi) = data.get("image_size"), IMAGE_SIZES
    if not _is_int(size) or not lo <= size <= hi:
        return f"data 'image_size' is {size!r}, expected a whole number in [{lo}, {hi}]"
    if data.get("options") is not None and not isinstance(data["options"], dict):
        return "data 'options' is not a mapping"
    norm = data.get("normalization")
    if norm is not None and not (isinstance(norm, dict) and _numbers(norm.get("mean")) and _numbers(norm.get("std"))
                                 and len(norm["mean"]) == len(norm["std"]) and min(norm["std"]) > 0):
        return "data 'normalization' is not a mean and a positive std per channel"
    if "epoch" in ckpt and (not _is_int(ckpt["epoch"]) or ckpt["epoch"] < 0):
        return f"'epoch' is {ckpt['epoch']!r}, expected a whole number >= 0"
    for key in ("train_config", "trainer", "rng"):
        if key in ckpt and not isinstance(ckpt[key], dict):
            return f"{key!r} is not a mapping"
    return None


def read_torch_file(path: Path, what: str = "checkpoint") -> Any:
    """``torch.load(path, weights_only=True)`` on CPU; CheckpointError with one line saying
    what is wrong with the file otherwise.

    PyTorch's own message for a refused file advises ``weights_only=False``, which would let
    the file run code: fedmoco never does that, so its message must not suggest it.
    """
    if not zipfile.is_zipfile(path):
        # torch.save has written zip archives since PyTorch 1.6; fedmoco writes nothing else.
        raise CheckpointError(f"{path}: not a readable {what}: not a PyTorch file "
                              "(damaged, truncated or another format)")
    # torch.load does not check the archive's CRC-32s: bytes flipped inside a tensor (a bad disk,
    # a torn copy) loaded silently and a resumed run trained on from them. One more read of the
    # file (about 0.1 s for a ResNet-18 checkpoint) finds them.
    try:
        with zipfile.ZipFile(path) as zf:
            damaged = zf.testzip()
    except Exception as exc:  # zipfile raises many types for damage (BadZipFile, zlib.error, NotImplementedError)
        raise CheckpointError(f"{path}: not a readable {what}: damaged PyTorch file ({type(exc).__name__})") from None
    if damaged is not None:
        raise CheckpointError(f"{path}: not a readable {what}: damaged PyTorch file (entry {damaged} fails its "
                              "CRC check)")
    with zipfile.ZipFile(path) as zf:  # TorchScript: code inside; torch.load's own message advised weights_only=False
        scripted = any("/code/__torch__/" in name for name in zf.namelist())
    if scripted:
        raise CheckpointError(f"{path}: a TorchScript export, not a {what}: load it with torch.jit.load, or give "
                              "the checkpoint it was exported from")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pickle-protocol chatter of the weights-only unpickler
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{path}: not a readable {what}: it holds Python objects other than tensors and plain "
                              "values, which fedmoco refuses to load because loading them can run code") from None
    except Exception as exc:  # torch raises many types for damaged archives
        first = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else ""
        raise CheckpointError(f"{path}: not a readable {what}: damaged PyTorch file "
                              f"({type(exc).__name__}{': ' + first if first else ''})") from None


#: MoCoConfig fields that shape the model's tensors: a checkpoint loads only into their values.
ARCHITECTURE_FIELDS = ("arch", "in_channels", "small_input", "norm", "dim", "mlp", "hidden_dim", "predictor",
                       "queue_size")


def check_compatible(path: Path | str, saved: dict[str, Any], wanted: dict[str, Any]) -> None:
    """Raise CheckpointError if the architecture-defining fields of two MoCo configs differ."""
    diffs = [f"{k} {saved.get(k)!r} (checkpoint) vs {wanted.get(k)!r} (requested)"
             for k in ARCHITECTURE_FIELDS if saved.get(k) != wanted.get(k)]
    if diffs:
        raise CheckpointError(f"{path}: checkpoint is for another model: " + "; ".join(diffs))


def rng_state() -> dict[str, Any]:
    """All RNG states as checkpoint-safe values (tensors and lists)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": _to_lists(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    random.setstate(_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        # one state per GPU of the machine that saved it; this one may have fewer
        for i, s in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)


def _to_lists(x: Any) -> Any:
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x: Any) -> Any:
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x

import os
import re

import pytest
import torch

from fedmoco.checkpoint import FORMAT, VERSION, atomic_save, check_compatible, load_checkpoint, rng_state, set_rng_state
from fedmoco.errors import CheckpointError


def record(**extra) -> dict:
    """The least a checkpoint holds for load_checkpoint to accept it (record_problem)."""
    return {"format": FORMAT, "version": 1, "moco_config": {}, "model": {"w": torch.zeros(1)},
            "data": {"domain": "images", "image_size": 32}, **extra}


def test_atomic_save_round_trip_and_no_temp_files_left(tmp_path):
    path = tmp_path / "sub" / "ck.pt"
    atomic_save(record(x=torch.arange(3)), path)
    assert torch.equal(load_checkpoint(path)["x"], torch.arange(3))
    assert os.listdir(path.parent) == ["ck.pt"]


def test_failed_save_keeps_previous_checkpoint(tmp_path):
    path = tmp_path / "ck.pt"
    atomic_save(record(x=1), path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_save({"format": FORMAT, "bad": Boom()}, path)
    assert load_checkpoint(path)["x"] == 1
    assert os.listdir(tmp_path) == ["ck.pt"]


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="missing.pt: checkpoint does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt: not a readable checkpoint"):
        load_checkpoint(junk)
    other = tmp_path / "other.pt"
    torch.save({"state": 1}, other)
    with pytest.raises(CheckpointError, match="other.pt: not a fedmoco checkpoint"):
        load_checkpoint(other)


def test_fedmocos_other_files_are_named_for_what_they_are(tmp_path):
    """An export's encoder.ts was 'damaged PyTorch file' quoting torch's advice to load with
    weights_only=False; server-state.pt, model.pt and backbone.pt were 'not a fedmoco
    checkpoint' with no pointer to the right file (found by an audit)."""
    scripted = torch.jit.script(torch.nn.Linear(2, 2))
    torch.jit.save(scripted, tmp_path / "encoder.ts")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "encoder.ts")
    assert str(err.value) == (f"{tmp_path / 'encoder.ts'}: a TorchScript export, not a checkpoint: load it with "
                              "torch.jit.load, or give the checkpoint it was exported from")
    for name, content, says in [
        ("server-state.pt", {"format": "fedmoco-server-state"}, "a federation's resume state; give encoder.pt "
                                                                 "beside it"),
        ("model.pt", {"format": "fedmoco-finetuned"}, "a fine-tuned classifier (fedmoco finetune's model.pt)"),
        ("backbone.pt", torch.nn.Linear(2, 2).state_dict(), "a plain state_dict (an export's backbone.pt?)"),
    ]:
        torch.save(content, tmp_path / name)
        with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / name}: not a fedmoco checkpoint: {says}")):
            load_checkpoint(tmp_path / name)


def test_bytes_flipped_inside_a_tensor_are_found_not_loaded(tmp_path):
    """torch.load does not check the archive's CRCs: a checkpoint with damaged tensor bytes
    loaded silently, and a resumed run trained on from it."""
    import zipfile

    path = tmp_path / "ck.pt"
    atomic_save({"format": FORMAT, "w": torch.arange(4096, dtype=torch.float32)}, path)
    with zipfile.ZipFile(path) as zf:
        entry = max(zf.infolist(), key=lambda i: i.file_size)  # the tensor's storage, stored uncompressed
    data = bytearray(path.read_bytes())
    start = entry.header_offset + 30 + len(entry.filename) + len(entry.extra) + 100
    data[start:start + 16] = bytes(16)
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"ck.pt: not a readable checkpoint: damaged PyTorch file \(entry "
                                              rf"{entry.filename} fails its CRC check\)"):
        load_checkpoint(path)


@pytest.mark.parametrize("raised", [NotImplementedError("That compression method is not supported"),
                                    __import__("zlib").error("Error -3 while decompressing data")])
def test_damage_the_crc_check_meets_in_other_forms_is_one_line_too(tmp_path, monkeypatch, raised):
    import zipfile

    path = tmp_path / "ck.pt"
    atomic_save({"format": FORMAT, "w": torch.zeros(4)}, path)

    def damaged(self):
        raise raised

    monkeypatch.setattr(zipfile.ZipFile, "testzip", damaged)
    with pytest.raises(CheckpointError, match=rf"ck.pt: not a readable checkpoint: damaged PyTorch file "
                                              rf"\({type(raised).__name__}\)"):
        load_checkpoint(path)


def test_a_checkpoint_of_a_newer_fedmoco_is_refused(tmp_path):
    """A checkpoint one format version ahead is refused with a message, not misread."""
    path = tmp_path / "newer.pt"
    atomic_save({"format": FORMAT, "version": VERSION + 1}, path)
    with pytest.raises(CheckpointError, match=rf"newer.pt: checkpoint version {VERSION + 1} is newer than this fedmoco"):
        load_checkpoint(path)


def test_compatibility_names_each_difference():
    with pytest.raises(CheckpointError, match="arch 'tiny' .* vs 'resnet18'.*in_channels 1 .* vs 3"):
        check_compatible("c.pt", {"arch": "tiny", "in_channels": 1}, {"arch": "resnet18", "in_channels": 3})
    check_compatible("c.pt", {"arch": "tiny"}, {"arch": "tiny"})


def test_a_checkpoint_with_another_queue_size_is_incompatible():
    """The queue length is part of the model (its buffer is in the state dict): resuming with
    another one is refused, naming both values."""
    with pytest.raises(CheckpointError, match=r"queue_size 4096 \(checkpoint\) vs 1024 \(requested\)"):
        check_compatible("c.pt", {"arch": "tiny", "queue_size": 4096}, {"arch": "tiny", "queue_size": 1024})


def test_rng_state_round_trip(tmp_path):
    import random

    import numpy as np

    state = rng_state()
    atomic_save(record(rng=state), tmp_path / "r.pt")
    a = (torch.rand(3), np.random.rand(), random.random())
    set_rng_state(load_checkpoint(tmp_path / "r.pt")["rng"])
    b = (torch.rand(3), np.random.rand(), random.random())
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2]


def test_cuda_generators_restored_only_for_the_gpus_this_machine_has(monkeypatch):
    # a checkpoint from a 2-GPU machine resumed on a 1-GPU one: the second state is not for here
    state = rng_state()
    state["cuda"] = [torch.full((4,), 7, dtype=torch.uint8), torch.full((4,), 9, dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, i: restored.append((int(s[0]), i)))
    set_rng_state(state)
    assert restored == [(7, 0)]

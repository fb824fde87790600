"""Checkpoints written like every other llmtune file: whole or not at all (a full disk leaves the previous last.ckpt,
never a truncated one under its real name), and read back before they replace it."""

import io

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from llmtune.files import write_atomic


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        # Our own object, just serialised in memory: loading it back proves the bytes decode before they go to disk.
        torch.load(io.BytesIO(buffer.getvalue()), map_location="cpu", weights_only=False)
        write_atomic(path, buffer.getvalue())

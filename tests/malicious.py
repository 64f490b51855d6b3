"""A checkpoint whose torch_dist metadata runs code when unpickled without restriction: every
reader of checkpoints must refuse it before anything of it is unpickled."""

import pickle
from pathlib import Path


class CreatesAFile:
    """Unpickled without restriction, this creates `path`: the witness that code ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def poison_checkpoint_metadata(save_dir: Path, witness: Path) -> Path:
    """Replace the .metadata of the latest checkpoint under `save_dir` with a pickle that creates
    `witness` when loaded; returns `witness`."""
    iteration = (save_dir / "latest_checkpointed_iteration.txt").read_text().strip()
    (save_dir / f"iter_{int(iteration):07d}" / ".metadata").write_bytes(pickle.dumps(CreatesAFile(witness)))
    return witness

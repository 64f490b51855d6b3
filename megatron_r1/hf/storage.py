"""Reading and writing weights a few tensors at a time: our torch_dist checkpoints (through
megatron-core's dist_checkpointing, which reads only the requested tensors' bytes and reassembles
them from however many TP/PP/EP shards were saved, and writes a checkpoint in parts) and Hugging
Face safetensors directories."""

import contextlib
import copy
import ctypes
import dataclasses
import json
import os
import pickle
import shutil

import torch

from megatron_r1.sharded_tensors import other_implementation_key

SAFETENSORS_INDEX = "model.safetensors.index.json"
SINGLE_SAFETENSORS = "model.safetensors"


class WeightsError(ValueError):
    """Weights missing, unreadable, or not of the shapes the configuration implies."""


def unmap_freed_tensors() -> bool:
    """Make glibc give each tensor-sized allocation its own mapping, returned to the OS when freed;
    True if set (glibc only). By default a freed allocation raises glibc's mmap threshold to its size
    (up to 32 MiB), so later tensors come from the heap, where layer after layer of freed tensors
    fragments it and stays resident: the peak then grows with the number of layers streamed.
    Process-wide, so for a conversion process (tools/convert_checkpoint.py), not a library call."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_mmap_threshold = -3  # <malloc.h>; setting it also turns off the dynamic adjustment
    return libc.mallopt(m_mmap_threshold, 128 * 1024) == 1  # glibc's initial threshold


class McoreCheckpointReader:
    """The model tensors of a torch_dist checkpoint (ours, or Megatron-LM's), as full (unsharded)
    tensors or slices of them on request. Needs a (one-process) torch.distributed group."""

    def __init__(self, path: str):
        from megatron.core import dist_checkpointing

        from megatron_r1.checkpointing import refuse_executable_pickles

        refuse_executable_pickles(path)  # before dist_checkpointing unpickles anything of it
        self.path = path
        self._metadata = {
            key: entry
            for key, entry in dist_checkpointing.load_tensors_metadata(path).items()
            if not key.startswith("optimizer.")
        }

    def keys(self) -> list[str]:
        return list(self._metadata)

    def name_as(self, keys) -> None:
        """Offer under `keys` (the local layers' names) the tensors the other layer implementation
        saved under its own (sharded_tensors.other_implementation_key); reads still use the saved key."""
        for key in keys:
            if key not in self._metadata and (alias := other_implementation_key(key, self._metadata)):
                self._metadata[key] = self._metadata.pop(alias)

    def shape(self, key: str) -> tuple:
        return tuple(self._metadata[key].global_shape)

    def load(self, keys) -> dict:
        missing = sorted(set(keys) - set(self._metadata))
        if missing:
            raise WeightsError(f"{self.path}: no tensor {', '.join(missing)}")
        return self.read_slices({key: self._metadata[key] for key in set(keys)})

    def read_slices(self, slices: dict) -> dict:
        """name -> the part of a checkpoint tensor that `slices`' ShardedTensor (without data) of that
        name selects by its key, global offset and local shape (prepended axes included, such as the
        layer axis of a stack of layers), read as the ShardedTensor's dtype. Each saved chunk that a
        slice overlaps is read whole (torch.distributed.checkpoint's reader), none other."""
        from megatron.core import dist_checkpointing

        # Copies (the load fills in their data), without prepended axes (megatron-core loads a piece with
        # them only as one of every piece of its tensor).
        request = {name: _without_prepended_axes(piece) for name, piece in slices.items()}
        loaded = dist_checkpointing.load(request, self.path, validate_access_integrity=False)
        # Without the common (non-tensor) state merged in, nor the leading axes of size 1.
        return {name: loaded[name].view(slices[name].local_shape) for name in request}


@contextlib.contextmanager
def _open_safetensors(path: str):
    """safe_open(path); a corrupt header or a truncated file (the library's SafetensorError), also
    while reading tensors, becomes a WeightsError naming the file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, "pt") as f:
            yield f
    except (SafetensorError, OSError) as error:
        raise WeightsError(f"{path}: not a readable safetensors file ({error})") from None


def _read_weight_map(index_path: str) -> dict[str, str]:
    """The tensor name -> shard file map of a safetensors index; WeightsError naming it otherwise."""
    try:
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (ValueError, KeyError, TypeError, RecursionError) as error:  # ValueError: bad JSON or UTF-8
        raise WeightsError(f"{index_path}: not a safetensors index ({type(error).__name__}: {error})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) and v for v in weight_map.values()):
        raise WeightsError(f"{index_path}: weight_map must map each tensor name to a shard file name")
    return weight_map


class SafetensorsReader:
    """The tensors of a Hugging Face directory (sharded with an index, or one model.safetensors),
    opened lazily so that only the requested tensors are read."""

    def __init__(self, directory: str):
        index_path = os.path.join(directory, SAFETENSORS_INDEX)
        if os.path.isfile(index_path):
            self.weight_map = _read_weight_map(index_path)
            missing = sorted(
                {name for name in self.weight_map.values() if not os.path.isfile(os.path.join(directory, name))}
            )
            if missing:
                raise WeightsError(f"{index_path} names shard(s) that do not exist: {', '.join(missing)}")
        elif os.path.isfile(os.path.join(directory, SINGLE_SAFETENSORS)):
            with _open_safetensors(os.path.join(directory, SINGLE_SAFETENSORS)) as f:
                self.weight_map = {name: SINGLE_SAFETENSORS for name in f.keys()}
        else:
            raise WeightsError(f"{directory}: neither {SAFETENSORS_INDEX} nor {SINGLE_SAFETENSORS}")
        self.directory = directory

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def shape(self, name: str) -> tuple:
        with _open_safetensors(os.path.join(self.directory, self.weight_map[name])) as f:
            if name not in f.keys():
                raise WeightsError(
                    f"{os.path.join(self.directory, self.weight_map[name])}: no tensor {name}, which the index puts there"
                )
            return tuple(f.get_slice(name).get_shape())

    def _by_file(self, names) -> dict[str, list[str]]:
        by_file = {}
        for name in names:
            by_file.setdefault(self.weight_map[name], []).append(name)
        return by_file

    def headers(self) -> dict[str, tuple[str, tuple]]:
        """``{name: (safetensors dtype such as "BF16" or "F8_E4M3", shape)}`` of every tensor, each
        file's header read once."""
        headers = {}
        for filename, names in self._by_file(self.weight_map).items():
            path = os.path.join(self.directory, filename)
            with _open_safetensors(path) as f:
                present = set(f.keys())
                for name in names:
                    if name not in present:
                        raise WeightsError(f"{path}: no tensor {name}, which the index puts there")
                    piece = f.get_slice(name)
                    headers[name] = (piece.get_dtype(), tuple(piece.get_shape()))
        return headers

    def load(self, names) -> dict:
        missing = sorted(set(names) - set(self.weight_map))
        if missing:
            raise WeightsError(f"{self.directory}: no tensor {', '.join(missing)}")
        tensors = {}
        for filename, file_names in self._by_file(names).items():
            with _open_safetensors(os.path.join(self.directory, filename)) as f:
                for name in file_names:
                    tensors[name] = f.get_tensor(name)
        return tensors


class ShardedSafetensorsWriter:
    """Writes tensors in arrival order into ``model-XXXXX-of-YYYYY.safetensors`` files of at most
    `max_shard_bytes` each (a larger single tensor gets a file of its own) and the index; holds at
    most one shard in memory."""

    def __init__(self, directory: str, max_shard_bytes: int):
        self.directory = directory
        self.max_shard_bytes = max_shard_bytes
        self._pending, self._pending_bytes = {}, 0
        self._files = []  # per shard: the names it holds
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        tensor = tensor.contiguous()
        if tensor.untyped_storage().nbytes() > size:
            # A view (one expert of our [E, out, in] tensor, the unpadded vocabulary rows) would keep
            # its whole base alive until the shard is written; the copy holds only its own bytes.
            tensor = tensor.clone()
        self._pending[name] = tensor
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        save_file(
            self._pending, os.path.join(self.directory, f"shard-{len(self._files)}.tmp"), metadata={"format": "pt"}
        )
        self._files.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> int:
        """Names the shards model-XXXXX-of-YYYYY and writes the index; the number of shards."""
        if self._pending:
            self._flush()
        weight_map = {}
        count = len(self._files)
        for i, names in enumerate(self._files):
            filename = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            os.replace(os.path.join(self.directory, f"shard-{i}.tmp"), os.path.join(self.directory, filename))
            weight_map.update(dict.fromkeys(names, filename))
        with open(os.path.join(self.directory, SAFETENSORS_INDEX), "w") as f:
            json.dump({"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}, f, indent=2)
        return count


def _without_prepended_axes(piece):
    """A ShardedTensor whose prepended axes (such as an expert's number) become leading axes of size
    1 of its data (if it has any yet): the same chunk of the same tensor in the checkpoint.
    megatron-core saves and loads a piece with prepended axes as a torch ShardedTensor built from
    every piece of the tensor in the one process, which fails when a save (a part) or a load holds
    only some of them (some experts of a layer, one layer of a stack of layers)."""
    ones = (1,) * piece.prepend_axis_num
    data = None if piece.data is None else piece.data.view(ones + piece.local_shape)
    return dataclasses.replace(piece, data=data, local_shape=ones + piece.local_shape, prepend_axis_num=0)


class TorchDistPartsWriter:
    """One torch_dist checkpoint directory, as megatron-core's dist_checkpointing.save writes it (and
    loads it under any layout), written in parts of at most `max_part_bytes` of tensors (a larger
    single piece gets a part of its own) so that the writer holds one part at a time.

    Each part is a dist_checkpointing.save of the pieces added since the previous one (ShardedTensors
    with their data, ShardedObjects) into a directory of its own, whose file then joins `directory`
    named as if one more rank had written it (``__<part>_0.distcp``). `finish` writes the one
    ``.metadata`` of the parts' merged, as torch.distributed.checkpoint's coordinator merges its
    ranks' plans (the pieces of one tensor may lie in several parts), then common.pt and
    metadata.json. The parts are saved without megatron-core's check that the pieces cover each
    tensor exactly once: the caller checks the whole sharded state dict beforehand
    (megatron.core.dist_checkpointing.state_dict_utils.save_preprocess)."""

    def __init__(self, directory: str, max_part_bytes: int):
        from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

        self.directory, self.max_part_bytes = directory, max_part_bytes
        # One file per part (megatron-core forks one writer process per file).
        self._strategy = TorchDistSaveShardedStrategy("torch_dist", 1, thread_count=1)
        self._pending, self._pending_bytes = [], 0
        self._metadata = None  # the parts' merged torch.distributed.checkpoint Metadata
        self.parts = 0

    def add(self, item) -> None:
        """Queue a ShardedTensor (its data: a tensor of its own, not a view) or a ShardedObject."""
        size = item.data.nbytes if isinstance(item.data, torch.Tensor) else 0
        if size and item.prepend_axis_num:
            item = _without_prepended_axes(item)
        if self._pending and self._pending_bytes + size > self.max_part_bytes:
            self._flush()
        self._pending.append(item)
        self._pending_bytes += size

    def flush(self) -> None:
        """Write the queued pieces as a part now (the next piece added starts a new one): a caller that
        reads a part's worth of pieces at a time then holds one part, not two."""
        if self._pending:
            self._flush()

    def _flush(self) -> None:
        from megatron.core import dist_checkpointing
        from torch.distributed.checkpoint import FileSystemReader

        part_dir = os.path.join(self.directory, f"part_{self.parts}.tmp")
        os.makedirs(part_dir)
        state = {str(i): item for i, item in enumerate(self._pending)}
        self._pending, self._pending_bytes = [], 0
        dist_checkpointing.save(state, part_dir, self._strategy, validate_access_integrity=False)
        del state
        self._merge(FileSystemReader(part_dir).read_metadata(), part_dir)
        shutil.rmtree(part_dir)
        self.parts += 1

    def _merge(self, metadata, part_dir: str) -> None:
        """Move the part's files into the directory and add its metadata to the merged one."""
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        files = {}
        for info in metadata.storage_data.values():
            files.setdefault(info.relative_path, f"__{self.parts}_{len(files)}.distcp")
        for name, new_name in files.items():
            os.replace(os.path.join(part_dir, name), os.path.join(self.directory, new_name))
        if self._metadata is None:
            self._metadata = copy.copy(metadata)
            self._metadata.state_dict_metadata, self._metadata.storage_data = {}, {}
            self._metadata.all_local_plans = []  # one per part, as one per rank
            if metadata.storage_meta is not None:
                self._metadata.storage_meta = dataclasses.replace(
                    metadata.storage_meta, checkpoint_id=self.directory, load_id=None
                )
        merged = self._metadata.state_dict_metadata
        chunks_before = {}  # a tensor's chunks from earlier parts: the index hints shift by as many
        for key, entry in metadata.state_dict_metadata.items():
            known = merged.setdefault(key, entry)
            if known is entry:
                chunks_before[key] = 0
            elif (
                isinstance(entry, TensorStorageMetadata)
                and isinstance(known, TensorStorageMetadata)
                and ((entry.size, entry.properties) == (known.size, known.properties))
            ):
                chunks_before[key] = len(known.chunks)
                known.chunks.extend(entry.chunks)
            else:
                raise WeightsError(f"{self.directory}: two parts hold {key} as different tensors or objects")
        for index, info in metadata.storage_data.items():
            if index.index is not None:
                index = dataclasses.replace(index, index=index.index + chunks_before[index.fqn])
            self._metadata.storage_data[index] = dataclasses.replace(info, relative_path=files[info.relative_path])
        self._metadata.all_local_plans += getattr(metadata, "all_local_plans", None) or []

    def finish(self, common_state_dict: dict) -> int:
        """Write the last part, the merged ``.metadata``, `common_state_dict` (common.pt: the state
        dict's non-sharded values) and megatron-core's metadata.json; the number of parts."""
        from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
        from megatron.core.dist_checkpointing.serialization import get_default_save_common_strategy

        if self._pending or self._metadata is None:
            self._flush()
        with open(os.path.join(self.directory, ".metadata"), "wb") as f:
            pickle.dump(self._metadata, f)  # as torch.distributed.checkpoint's FileSystemWriter
        get_default_save_common_strategy().save_common(common_state_dict, self.directory)
        save_config(CheckpointingConfig(self._strategy.backend, self._strategy.version), self.directory)
        return self.parts

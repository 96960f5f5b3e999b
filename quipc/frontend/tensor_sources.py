"""Read one named tensor of a checkpoint at a time, without loading the rest: a folder of
safetensors files (one file or shards with an index json), or a GGUF file through its
memory map (dequantized by the `gguf` package, names and layout mapped by transformers'
own GGUF helpers). Names are the transformers model's parameter names."""
from __future__ import annotations

import contextlib
import json
import mmap
from pathlib import Path

import numpy as np
import torch

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"


class SafetensorsSource:
    """Tensors of a Hugging Face folder, each read from its shard by name (safe_open)."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        folder = Path(folder)
        index = folder / SAFETENSORS_INDEX
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (folder / SAFETENSORS_SINGLE).is_file():
            files = [SAFETENSORS_SINGLE]
        else:
            raise ValueError(f"{folder} holds no safetensors weights ({SAFETENSORS_SINGLE} or "
                             f"{SAFETENSORS_INDEX}): the streaming loader reads safetensors only")
        self._where = {}
        for f in files:
            with _readable(folder / f) as path, safe_open(path, framework="pt") as handle:
                self._where.update({name: folder / f for name in handle.keys()})

    def names(self) -> set[str]:
        return set(self._where)

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        # opened per read: a file kept open keeps every page read from it mapped (resident)
        with _readable(self._where[name]) as path, safe_open(path, framework="pt") as handle:
            return handle.get_tensor(name)


@contextlib.contextmanager
def _readable(path: Path):
    """Yields str(path); safetensors' own errors (a truncated or foreign file) become a
    ValueError that names the file."""
    from safetensors import SafetensorError

    try:
        yield str(path)
    except SafetensorError as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e}): truncated or corrupted?") from None


class GGUFSource:
    """Tensors of a GGUF file: looked up in its memory map, dequantized one at a time."""

    def __init__(self, path: Path, skeleton: torch.nn.Module):
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, read_field

        from . import gguf_file

        self._reader = gguf_file.reader(path)
        arch = read_field(self._reader, "general.architecture")[0]
        # the processors read the head counts under transformers' names: the skeleton's config has them
        self._processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=skeleton.config.to_dict())
        self._to_hf = gguf_file.weights_map(skeleton, self._processor)
        self._tensors = {t.name: t for t in self._reader.tensors if t.name in self._to_hf}
        self._by_hf = {self._to_hf[n]: n for n in self._tensors}

    def names(self) -> set[str]:
        return set(self._by_hf)

    def get(self, name: str) -> torch.Tensor:
        from gguf import dequantize

        gname = self._by_hf[name]
        tensor = self._tensors[gname]
        result = self._processor.process(weights=dequantize(tensor.data, tensor.tensor_type), name=gname,
                                         tensor_key_mapping=self._to_hf, parsed_parameters={"tensors": {}})
        if result.weights is None or result.name != gname:
            raise ValueError(f"GGUF tensor {gname} does not map to one transformers tensor: "
                             "this architecture cannot be streamed")
        out = torch.from_numpy(np.copy(result.weights))
        self._unmap(tensor)
        return out

    def _unmap(self, tensor) -> None:
        """Drop the pages of `tensor` from this process's memory map (they stay in the page
        cache): otherwise every tensor read stays resident and memory grows with depth."""
        mapped = getattr(self._reader.data, "_mmap", None)
        if mapped is None or not hasattr(mapped, "madvise"):
            return
        start = tensor.data_offset // mmap.PAGESIZE * mmap.PAGESIZE
        end = min(tensor.data_offset + tensor.n_bytes, len(mapped))
        mapped.madvise(mmap.MADV_DONTNEED, start, end - start)

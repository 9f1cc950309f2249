"""A local directory of safetensors files, seen as one lazy state dict: a tensor is read when it is asked for.

Hugging Face checkpoints ship `model.safetensors`, or shards that `model.safetensors.index.json`
lists (its `weight_map`: tensor name -> file). `SafetensorsDir` opens each file once with
`safe_open`, which memory-maps it, and reads a tensor only on `sd[name]`: the tensor is a view of
the mapped file (page cache, not a copy in process memory). `models/build.py` copies a state dict
into a model one tensor at a time, so a model loads from such a directory without the whole
checkpoint ever being held in host memory. Nothing is downloaded.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Union

import torch
from safetensors import safe_open

INDEX = "model.safetensors.index.json"


class SafetensorsDir(Mapping[str, torch.Tensor]):
    """Every tensor of `directory`'s safetensors files by name, read lazily.

    With an index file, the files it names; without one, every `*.safetensors` file in the
    directory (a name in two files is an error). FileNotFoundError when there is none.
    """

    def __init__(self, directory: Union[str, Path]) -> None:
        self.directory = Path(directory)
        index = self.directory / INDEX
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.directory.glob("*.safetensors"))
            weight_map = {}
        if not files:
            raise FileNotFoundError(f"{self.directory} holds no *.safetensors file (and no {INDEX})")
        self._handles: dict[str, Any] = {}
        for name in files:
            path = self.directory / name
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing (listed in {index})")
            self._handles[name] = safe_open(str(path), framework="pt")
        if not weight_map:
            for name, handle in self._handles.items():
                for key in handle.keys():
                    if key in weight_map:
                        raise ValueError(f"{key} is in both {weight_map[key]} and {name}; add a {INDEX}")
                    weight_map[key] = name
        self._files = weight_map

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._handles[self._files[key]].get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


__all__ = ["SafetensorsDir"]

"""Read checkpoints (native or Hugging Face, single file or sharded) straight into a model on its device.

Tensors are read one at a time and sliced to this rank's shard as they are read: onto a GPU straight from the
files through pinned memory (gpu_reads.py); for the CPU from memory-mapped safetensors (or, for older native
releases, a weights-only `consolidated.00.pth`). Each is converted to the target dtype on the target device, so
host memory never holds a float32 copy of a bf16 model, and a tensor-parallel rank never reads another rank's rows.
"""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from safetensors import SafetensorError, safe_open

from mistral_chat.engine.config import CheckpointFormat, ModelConfig
from mistral_chat.engine.gpu_reads import GpuReader, TensorEntry, read_header, read_tensor
from mistral_chat.engine.parallel.sharding import Parallel
from mistral_chat.errors import ModelFilesError

if TYPE_CHECKING:
    from mistral_chat.engine.lora import LoraAdapter

log = logging.getLogger(__name__)

_STORED_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
_DTYPE_NAMES = {dtype: name for name, dtype in _STORED_DTYPES.items()}
Progress = Callable[[int, int], None]  # (tensors done, tensors in all)
# Turns one checkpoint tensor, named as in `Transformer`, into the tensors to store (on device, in dtype; or an
# int8 weight and its scales, see quant.py).
Convert = Callable[[str, torch.Tensor], dict[str, torch.Tensor]]


def plain_convert(device: torch.device, dtype: torch.dtype) -> Convert:
    return lambda name, t: {name: t.to(device=device, dtype=dtype)}



def _plain_file_name(name: object) -> bool:
    """A file name with no path parts: a shard listed in an index must sit in the index's own folder."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\0" not in name)

class _PthTensor:
    """One tensor of a .pth checkpoint behind the part of safetensors' slice API the reader uses."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor

    def get_shape(self) -> list[int]:
        return list(self.tensor.shape)

    def get_dtype(self) -> str:
        return _DTYPE_NAMES.get(self.tensor.dtype, str(self.tensor.dtype))

    def __getitem__(self, index) -> torch.Tensor:
        return self.tensor[index].clone()  # a tensor of its own, as safetensors gives, not a view of the map


class PthCheckpoint:
    """A `consolidated.NN.pth` state dict, loaded weights-only and memory-mapped: never unpickles objects."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:  # files of torch < 1.6 (legacy format) cannot be mapped
                if "mmap" not in str(exc):
                    raise
                state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise ModelFilesError(f"{path} holds Python objects besides tensors, which mistral-chat will not "
                                  "unpickle: use the model's safetensors release (or convert the file)") from exc
        except (RuntimeError, OSError, EOFError, ValueError) as exc:
            raise ModelFilesError(f"{path} is truncated or not a PyTorch checkpoint ({exc}): "
                                  "delete it and download it again") from exc
        if not isinstance(state, dict) or not all(
                isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
            raise ModelFilesError(f"{path} is not a state dict of named tensors: use the model's safetensors "
                                  "release")
        self.state: dict[str, torch.Tensor] = state

    def keys(self):
        return self.state.keys()

    def get_slice(self, name: str) -> _PthTensor:
        return _PthTensor(self.state[name])


class CheckpointReader:
    """Maps tensor names to the safetensors file holding them and reads (slices of) them: onto `device` directly
    where it is a GPU (gpu_reads.py, several times faster than through the CPU), else as CPU tensors. `close`
    releases the GPU path's pinned buffers and files."""

    def __init__(self, model_dir: Path, fmt: CheckpointFormat, device: torch.device | None = None) -> None:
        self.model_dir = Path(model_dir)
        self.format = fmt
        self.files = self._weight_files()
        self._handles: dict[Path, object] = {}
        self._gpu = GpuReader(device) if device is not None and device.type == "cuda" else None
        self._headers: dict[Path, dict[str, TensorEntry]] = {}
        self.index: dict[str, Path] = {}
        for path in self.files:
            for name in self._open(path).keys():
                if path.suffix == ".pth" and name in self.index:
                    raise ModelFilesError(f"'{name}' is in both {self.index[name].name} and {path.name}: "
                                          "model-parallel .pth shards are not supported, use the safetensors "
                                          "release of the model")
                self.index[name] = path

    def _weight_files(self) -> list[Path]:
        stem = "consolidated" if self.format == "native" else "model"
        index = self.model_dir / f"{stem}.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError("weight_map is not an object")
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ModelFilesError(f"{index} is not a valid safetensors index ({exc}): re-download the model")
            bad = sorted({repr(f)[:80] for f in weight_map.values() if not _plain_file_name(f)})
            if bad:
                raise ModelFilesError(f"{index} names shard file(s) outside its folder or not plain file names "
                                      f"({', '.join(bad)}): refused; re-download the model or fix the index")
            files = sorted({self.model_dir / f for f in weight_map.values()})
            missing = [f.name for f in files if not f.exists()]
            if missing:
                raise ModelFilesError(f"{self.model_dir} lacks shard(s) {', '.join(missing)} listed in {index.name}: "
                                      "finish the download with `mistral-chat pull`")
            return files
        files = sorted(self.model_dir.glob(f"{stem}*.safetensors"))
        if not files and self.format == "native":  # older native releases: consolidated.00.pth
            files = sorted(self.model_dir.glob("consolidated*.pth"))
        if not files:
            if any(self.model_dir.glob("*.pth")) or any(self.model_dir.glob("*.bin")):
                raise ModelFilesError(f"{self.model_dir} holds only .pth/.bin weights; mistral-chat reads "
                                      "safetensors: pull the safetensors version of the model")
            raise ModelFilesError(f"{self.model_dir} has no {stem}*.safetensors weights: "
                                  "the download is incomplete, run `mistral-chat pull` again")
        return files

    def _open(self, path: Path):
        if path not in self._handles and path.suffix == ".pth":
            self._handles[path] = PthCheckpoint(path)
        if path not in self._handles:
            try:
                self._handles[path] = safe_open(str(path), framework="pt", device="cpu")
            except (SafetensorError, OSError, ValueError) as exc:
                raise ModelFilesError(f"{path} is truncated or corrupt ({exc}): delete it and download it again "
                                      "with `mistral-chat pull`") from exc
        return self._handles[path]

    def stored_dtype(self) -> torch.dtype | None:
        """The dtype the weights are stored in (of the first tensor), read from the header only."""
        name = next(iter(self.index), None)
        if name is None:
            return None
        return _STORED_DTYPES.get(self._open(self.index[name]).get_slice(name).get_dtype())

    def read(self, name: str, shape: tuple[int, ...], rows: slice | None = None,
             cols: slice | None = None) -> torch.Tensor:
        """The tensor `name` (checked to be `shape`), optionally only some rows or columns of it."""
        path = self.index.get(name)
        if path is None:
            raise ModelFilesError(f"tensor '{name}' is missing from {self.model_dir}: the checkpoint is incomplete "
                                  "or not a Mistral/Mixtral model")
        if self._gpu is not None and path.suffix == ".safetensors":
            return self._read_to_gpu(path, name, shape, rows, cols)
        view = self._open(path).get_slice(name)
        found = tuple(view.get_shape())
        self._check_shape(path, name, found, shape)
        try:
            if rows is not None and cols is not None:
                return view[rows, cols]
            if rows is not None:
                return view[rows]
            if cols is not None:
                return view[:, cols]
            return view[:]
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise ModelFilesError(f"could not read '{name}' from {path} ({exc}): the file is corrupt, "
                                  "download it again") from exc


    def _check_shape(self, path: Path, name: str, found: tuple[int, ...], shape: tuple[int, ...]) -> None:
        if found != tuple(shape):
            config = "params.json" if self.format == "native" else "config.json"
            raise ModelFilesError(f"tensor '{name}' in {path} has shape {list(found)}, but {config} says "
                                  f"{list(shape)}: the config and weights do not match, re-download the model")

    def _read_to_gpu(self, path: Path, name: str, shape: tuple[int, ...], rows: slice | None,
                     cols: slice | None) -> torch.Tensor:
        assert self._gpu is not None
        if path not in self._headers:
            self._headers[path] = read_header(path)
        entry = self._headers[path].get(name)
        if entry is None:  # safetensors listed it, this parser did not: an unusual dtype
            raise ModelFilesError(f"tensor '{name}' in {path} has a dtype mistral-chat does not read: use a "
                                  "bf16, fp16 or fp32 release of the model")
        self._check_shape(path, name, entry.shape, shape)
        return read_tensor(self._gpu, path, entry, rows, cols)

    def close(self) -> None:
        if self._gpu is not None:
            self._gpu.close()


def _unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Hugging Face stores q/k rows in rotate-half order; back to interleaved pairs, head by head."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


class _Names:
    """Source tensor names for each layout."""

    def __init__(self, fmt: CheckpointFormat) -> None:
        self.fmt = fmt

    def top(self, what: str) -> str:
        native = {"embed": "tok_embeddings.weight", "norm": "norm.weight", "output": "output.weight"}
        hf = {"embed": "model.embed_tokens.weight", "norm": "model.norm.weight", "output": "lm_head.weight"}
        return (native if self.fmt == "native" else hf)[what]

    def layer(self, i: int, what: str) -> str:
        if self.fmt == "native":
            return {
                "attention_norm": f"layers.{i}.attention_norm.weight", "ffn_norm": f"layers.{i}.ffn_norm.weight",
                "wq": f"layers.{i}.attention.wq.weight", "wk": f"layers.{i}.attention.wk.weight",
                "wv": f"layers.{i}.attention.wv.weight", "wo": f"layers.{i}.attention.wo.weight",
                "w1": f"layers.{i}.feed_forward.w1.weight", "w2": f"layers.{i}.feed_forward.w2.weight",
                "w3": f"layers.{i}.feed_forward.w3.weight", "gate": f"layers.{i}.feed_forward.gate.weight",
            }[what]
        p = f"model.layers.{i}"
        return {
            "attention_norm": f"{p}.input_layernorm.weight", "ffn_norm": f"{p}.post_attention_layernorm.weight",
            "wq": f"{p}.self_attn.q_proj.weight", "wk": f"{p}.self_attn.k_proj.weight",
            "wv": f"{p}.self_attn.v_proj.weight", "wo": f"{p}.self_attn.o_proj.weight",
            "w1": f"{p}.mlp.gate_proj.weight", "w2": f"{p}.mlp.down_proj.weight",
            "w3": f"{p}.mlp.up_proj.weight", "gate": f"{p}.block_sparse_moe.gate.weight",
        }[what]

    def expert(self, i: int, e: int, w: str) -> str:
        if self.fmt == "native":
            return f"layers.{i}.feed_forward.experts.{e}.{w}.weight"
        return f"model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight"


def _span(size: int, parallel: Parallel) -> slice:
    per = size // parallel.world
    return slice(parallel.rank * per, (parallel.rank + 1) * per)


def checkpoint_state(reader: CheckpointReader, config: ModelConfig, parallel: Parallel,
                     convert: Convert, progress: Progress | None = None, adapter: LoraAdapter | None = None
                     ) -> dict[str, torch.Tensor]:
    """This rank's tensors, named as in `Transformer`, each passed through `convert` as soon as it is read.

    With `adapter`, LoRA updates are merged into the projections as read (native layout, before fusing and
    converting; see lora.py)."""
    names = _Names(reader.format)
    c = config
    hd = c.head_dim
    state: dict[str, torch.Tensor] = {}
    head_rows = _span(c.n_heads * hd, parallel)
    local_kv = parallel.local_kv_heads(c.n_kv_heads)
    if c.n_kv_heads % parallel.world == 0:
        kv_rows = _span(c.n_kv_heads * hd, parallel)
    else:  # replicate the one KV head this rank's query heads share
        kv_head = (parallel.rank * (c.n_heads // parallel.world)) // (c.n_heads // c.n_kv_heads)
        kv_rows = slice(kv_head * hd, (kv_head + 1) * hd)
    hidden_rows = _span(c.hidden_dim, parallel)
    total = 3 + c.n_layers * (3 + (1 + c.num_experts if c.is_moe else 1))
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    def put(name: str, tensor: torch.Tensor) -> None:
        state.update(convert(name, tensor))

    def read(name: str, shape: tuple[int, ...], rows: slice | None = None, cols: slice | None = None):
        return reader.read(name, shape, rows if parallel.enabled else None, cols if parallel.enabled else None)

    def qk(name: str, n_heads: int, rows: slice, local_heads: int) -> torch.Tensor:
        w = read(name, (n_heads * hd, c.dim), rows)
        return _unpermute(w, local_heads) if reader.format == "hf" else w

    def lora(module: str, w: torch.Tensor, rows: slice | None = None, cols: slice | None = None) -> torch.Tensor:
        if adapter is None:
            return w
        return adapter.merge(module, w, rows if parallel.enabled else None, cols if parallel.enabled else None)

    put("tok_embeddings.weight", read(names.top("embed"), (c.vocab_size, c.dim), _span(c.vocab_size, parallel)))
    tick()
    put("norm.weight", reader.read(names.top("norm"), (c.dim,)))
    tick()
    output_name = names.top("output")
    if output_name not in reader.index and c.tie_embeddings:
        output_name = names.top("embed")
    put("output.weight", read(output_name, (c.vocab_size, c.dim), _span(c.vocab_size, parallel)))
    tick()
    for i in range(c.n_layers):
        p = f"layers.{i}"
        for ours in ("attention_norm", "ffn_norm"):
            put(f"{p}.{ours}.weight", reader.read(names.layer(i, ours), (c.dim,)))
        tick()
        q = lora(f"{p}.attention.wq", qk(names.layer(i, "wq"), c.n_heads, head_rows, c.n_heads // parallel.world),
                 head_rows)
        k = lora(f"{p}.attention.wk", qk(names.layer(i, "wk"), c.n_kv_heads, kv_rows, local_kv), kv_rows)
        v = lora(f"{p}.attention.wv", read(names.layer(i, "wv"), (c.n_kv_heads * hd, c.dim), kv_rows), kv_rows)
        put(f"{p}.attention.wqkv.weight", _cat([q, k, v]))
        del q, k, v
        tick()
        put(f"{p}.attention.wo.weight", lora(f"{p}.attention.wo",
            read(names.layer(i, "wo"), (c.dim, c.n_heads * hd), None, head_rows), None, head_rows))
        tick()
        if not c.is_moe:
            w1 = lora(f"{p}.feed_forward.w1", read(names.layer(i, "w1"), (c.hidden_dim, c.dim), hidden_rows),
                      hidden_rows)
            w3 = lora(f"{p}.feed_forward.w3", read(names.layer(i, "w3"), (c.hidden_dim, c.dim), hidden_rows),
                      hidden_rows)
            put(f"{p}.feed_forward.w13.weight", _cat([w1, w3]))
            put(f"{p}.feed_forward.w2.weight", lora(f"{p}.feed_forward.w2",
                read(names.layer(i, "w2"), (c.dim, c.hidden_dim), None, hidden_rows), None, hidden_rows))
            tick()
            continue
        put(f"{p}.feed_forward.gate.weight", reader.read(names.layer(i, "gate"), (c.num_experts, c.dim)))
        tick()
        for e in range(c.num_experts):  # copied into stacked tensors one expert at a time
            ex = f"{p}.feed_forward.experts.{e}"
            w1 = lora(f"{ex}.w1", read(names.expert(i, e, "w1"), (c.hidden_dim, c.dim), hidden_rows), hidden_rows)
            w3 = lora(f"{ex}.w3", read(names.expert(i, e, "w3"), (c.hidden_dim, c.dim), hidden_rows), hidden_rows)
            for key, t in convert(f"{p}.feed_forward.w13", _cat([w1, w3])).items():
                _stack_into(state, key, e, c.num_experts, t)
            w2 = lora(f"{ex}.w2", read(names.expert(i, e, "w2"), (c.dim, c.hidden_dim), None, hidden_rows),
                      None, hidden_rows)
            for key, t in convert(f"{p}.feed_forward.w2", w2).items():
                _stack_into(state, key, e, c.num_experts, t)
            tick()
    return state


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate rows; a merged LoRA part is float32 on the load device, so the others join it there."""
    device = parts[0].device if all(t.device == parts[0].device for t in parts) else \
        next(t.device for t in parts if t.device.type != "cpu")
    return torch.cat([t.to(device) for t in parts])


def _stack_into(state: dict[str, torch.Tensor], name: str, index: int, count: int, t: torch.Tensor) -> None:
    if name not in state:
        state[name] = torch.empty((count, *t.shape), dtype=t.dtype, device=t.device)
    state[name][index] = t

"""Writes a safetensors file (f32 tensors) as a PyTorch zip-format state dict, without torch.

The layout is what `torch.save(state_dict, path)` writes since PyTorch 1.6: a stored zip with
`archive/data.pkl` (protocol 2 pickle of an OrderedDict of tensors rebuilt by
`torch._utils._rebuild_tensor_v2` from persistent storages), `archive/data/<key>` (raw
little-endian storage bytes) and `archive/version`. Used by the loader test only.

    python3 safetensors_to_pth.py IN.safetensors OUT.pth
"""

import collections
import json
import pickle
import struct
import sys
import types
import zipfile

torch = types.ModuleType("torch")
utils = types.ModuleType("torch._utils")


class FloatStorage:
    pass


FloatStorage.__module__ = "torch"
torch.FloatStorage = FloatStorage


def _rebuild_tensor_v2(*args):
    raise RuntimeError("pickled by reference only")


_rebuild_tensor_v2.__module__ = "torch._utils"
utils._rebuild_tensor_v2 = _rebuild_tensor_v2
sys.modules["torch"], sys.modules["torch._utils"] = torch, utils


class Storage:
    def __init__(self, key, numel):
        self.key, self.numel = key, numel


class Tensor:
    def __init__(self, key, shape):
        self.key, self.shape = key, tuple(shape)

    def __reduce__(self):
        numel = 1
        for s in self.shape:
            numel *= s
        strides, acc = [], 1
        for s in reversed(self.shape):
            strides.insert(0, acc)
            acc *= s
        return (_rebuild_tensor_v2,
                (Storage(self.key, numel), 0, self.shape, tuple(strides), False, collections.OrderedDict()))


class Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", FloatStorage, obj.key, "cpu", obj.numel)
        return None


def main(src, dst):
    data = open(src, "rb").read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    body = data[8 + n:]
    state, blobs = collections.OrderedDict(), {}
    for i, (name, info) in enumerate(sorted((k, v) for k, v in header.items() if k != "__metadata__")):
        if info["dtype"] != "F32":
            raise SystemExit(f"{name}: only F32 tensors are supported, found {info['dtype']}")
        a, b = info["data_offsets"]
        blobs[str(i)] = body[a:b]
        state[name] = Tensor(str(i), info["shape"])
    import io
    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump(state)
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        for k, v in blobs.items():
            z.writestr(f"archive/data/{k}", v)
        z.writestr("archive/version", "3\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

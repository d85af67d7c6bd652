#!/usr/bin/python3
"""Overwrites values of one tensor of a safetensors file in place (test fault injection).

usage: patch_safetensors.py FILE TENSOR VALUE [INDEX]   (all elements, or only element INDEX)
VALUE is a float ('nan' and 'inf' allowed); the file's dtype (F32, F16, BF16) is respected.
"""
import json
import struct
import sys

import numpy as np


def main():
    path, name, value = sys.argv[1], sys.argv[2], float(sys.argv[3])
    index = int(sys.argv[4]) if len(sys.argv) > 4 else None
    with open(path, "r+b") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        t = header[name]
        begin, end = t["data_offsets"]
        f.seek(8 + n + begin)
        raw = bytearray(f.read(end - begin))
        if t["dtype"] == "F32":
            arr = np.frombuffer(raw, np.float32).copy()
            arr[slice(None) if index is None else index] = value
            out = arr.tobytes()
        elif t["dtype"] == "F16":
            arr = np.frombuffer(raw, np.float16).copy()
            arr[slice(None) if index is None else index] = value
            out = arr.tobytes()
        elif t["dtype"] == "BF16":
            arr = np.frombuffer(raw, np.uint16).copy()
            bits = (np.array([value], np.float32).view(np.uint32) >> 16).astype(np.uint16)[0]
            arr[slice(None) if index is None else index] = bits
            out = arr.tobytes()
        else:
            sys.exit(f"unsupported dtype {t['dtype']}")
        f.seek(8 + n + begin)
        f.write(out)


if __name__ == "__main__":
    main()

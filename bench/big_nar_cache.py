#!/usr/bin/env python3
"""bench/big_nar_cache.py COUNT SIZE — in the current directory, writes a Nix binary cache
(`cache/`, uncompressed) of COUNT store paths, each one regular file of SIZE random bytes,
and `paths.txt` listing them. NARs are written directly (streamed, SHA-256 on the way)."""
import hashlib, os, struct, sys
ALPH = "0123456789abcdfghijklmnpqrsvwxyz"
def nix32(b):
    n = len(b); out = []
    l = (n * 8 - 1) // 5 + 1
    for i in range(l - 1, -1, -1):
        bit = i * 5; j = bit // 8; k = bit % 8
        c = (b[j] >> k) | ((b[j + 1] << (8 - k)) if j + 1 < n else 0)
        out.append(ALPH[c & 0x1f])
    return "".join(out)
def tok(s):
    return struct.pack("<Q", len(s)) + s + b"\0" * ((8 - len(s) % 8) % 8)
count, size = int(sys.argv[1]), int(sys.argv[2])
os.makedirs("cache/nar", exist_ok=True)
with open("paths.txt", "w") as paths:
    for i in range(count):
        h = nix32(hashlib.sha256(b"big%d" % i).digest()[:20])
        sp = f"/nix/store/{h}-big-{i}"
        head = b"".join(tok(t) for t in [b"nix-archive-1", b"(", b"type", b"regular", b"contents"]) + struct.pack("<Q", size)
        tail = b"\0" * ((8 - size % 8) % 8) + tok(b")")
        sha = hashlib.sha256()
        name = f"nar/{h}.nar"
        with open("cache/" + name, "wb") as f, open("/dev/urandom", "rb") as r:
            for part in [head]:
                f.write(part); sha.update(part)
            left = size
            while left:
                b = r.read(min(left, 8 << 20)); f.write(b); sha.update(b); left -= len(b)
            f.write(tail); sha.update(tail)
        nar_size = len(head) + size + len(tail)
        with open(f"cache/{h}.narinfo", "w") as ni:
            ni.write(f"StorePath: {sp}\nURL: {name}\nCompression: none\nNarHash: sha256:{nix32(sha.digest())}\nNarSize: {nar_size}\nReferences: \n")
        paths.write(sp + "\n")
open("cache/nix-cache-info", "w").write("StoreDir: /nix/store\n")

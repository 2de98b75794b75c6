#!/usr/bin/env python3
"""bench/synthetic_cache.py OUTDIR [--paths N] [--depth D] [--seed S] [--compression none|xz]

Writes a deterministic synthetic Nix binary cache of N store paths whose references form
a DAG of dependency depth D (the longest reference chain from the root has D edges):

  OUTDIR/cache/            the binary cache, to serve over HTTP (bench/cache_server.py)
      nix-cache-info       StoreDir: /nix/store, WantMassQuery: 1, Priority: 40
      <hash>.narinfo       StorePath, URL, Compression, FileHash, FileSize, NarHash,
                           NarSize, References, Deriver, Sig (unless --no-sign)
      nar/<filehash>.nar   (or .nar.xz with --compression xz)
  OUTDIR/ROOT_PATH         the root store path: its closure is all N paths
  OUTDIR/closure.txt       all N store paths, one a line
  OUTDIR/manifest.json     per path: narHash (sha256:<nixbase32> and SRI), narSize,
                           references, level, NAR file name
  OUTDIR/public-key        name:base64 (trusted-public-keys entry), when signed
  OUTDIR/secret-key        name:base64(seed || public key), when signed

Shape: N-1 paths spread evenly over levels 0..D-1 plus one root at level D. A path of
level 0 has no references; a path of level L >= 1 references 1-4 paths of lower levels,
at least one of them of level L-1 (so chains are exactly as deep as the levels). The root
references every path that nothing else references (all of level D-1, and any stragglers),
so one root names the whole closure. Each path is a small NAR of a few KB: a single
regular file (sometimes executable) or a small directory (bin/, lib/ with a symlink,
share/doc, nix-support/ listing its references as store paths), contents derived from
--seed and the path's name only (same arguments, same bytes, on any machine).

Store path hashes are 20-byte digests (XOR-folded SHA-256 of seed, N, D and name) in Nix base32;
NarHash is SHA-256 of the NAR in Nix base32, as Nix writes it. Signatures are ed25519 over
Nix's fingerprint `1;<path>;<narhash>;<narsize>;<refs>`, with a key derived from --seed
(needs the `cryptography` module; without it the cache is written unsigned, with a note).

OUTDIR --check-path-info FILE checks a `path-info --json --recursive ROOT` output (Nix's or
arca's: a list of objects, or an object keyed by path) against OUTDIR/manifest.json: the
same set of paths, and per path the NarHash (SRI or sha256:nixbase32), NarSize and
references. Prints one line; exit 1 on any difference.

--verify-with-nix K (needs nix-store/nix-hash) restores K NARs with `nix-store --restore`,
dumps them back with `nix-store --dump` and checks the bytes and `nix-hash --flat` NarHash.
"""
import argparse
import base64
import hashlib
import json
import lzma
import os
import shutil
import subprocess
import sys
import tempfile

NIX_ALPHABET = "0123456789abcdfghijklmnpqrsvwxyz"
STORE_DIR = "/nix/store"
KEY_NAME = "arca-synthetic-1"


def nixbase32(data: bytes) -> str:
    """Nix base32: most significant 5-bit group first, reading the bytes from their end."""
    n = (len(data) * 8 + 4) // 5
    out = []
    for i in range(n - 1, -1, -1):
        bit = i * 5
        j, k = divmod(bit, 8)
        c = data[j] >> k
        if j + 1 < len(data):
            c |= data[j + 1] << (8 - k)
        out.append(NIX_ALPHABET[c & 0x1F])
    return "".join(out)


def compress_hash(digest: bytes, size: int = 20) -> bytes:
    out = bytearray(size)
    for i, b in enumerate(digest):
        out[i % size] ^= b
    return bytes(out)


class Rng:
    """A deterministic byte/int stream: SHA-256 in counter mode over a key."""

    def __init__(self, key: str):
        self.key = key.encode()
        self.ctr = 0
        self.buf = b""

    def bytes(self, n: int) -> bytes:
        while len(self.buf) < n:
            self.buf += hashlib.sha256(self.key + b":" + str(self.ctr).encode()).digest()
            self.ctr += 1
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def below(self, n: int) -> int:
        return int.from_bytes(self.bytes(8), "little") % n

    def between(self, lo: int, hi: int) -> int:
        """An int in [lo, hi]."""
        return lo + self.below(hi - lo + 1)


# --- NAR -----------------------------------------------------------------------------
# A tree is ("regular", bytes, executable) | ("symlink", target) | ("directory", {name: tree}).


def nar_str(b: bytes) -> bytes:
    return len(b).to_bytes(8, "little") + b + b"\0" * (-len(b) % 8)


def nar_node(node, out: list):
    out.append(nar_str(b"("))
    out.append(nar_str(b"type"))
    kind = node[0]
    if kind == "regular":
        out.append(nar_str(b"regular"))
        if node[2]:
            out.append(nar_str(b"executable"))
            out.append(nar_str(b""))
        out.append(nar_str(b"contents"))
        out.append(nar_str(node[1]))
    elif kind == "symlink":
        out.append(nar_str(b"symlink"))
        out.append(nar_str(b"target"))
        out.append(nar_str(node[1]))
    elif kind == "directory":
        out.append(nar_str(b"directory"))
        for name in sorted(node[1], key=lambda s: s.encode()):
            out.append(nar_str(b"entry"))
            out.append(nar_str(b"("))
            out.append(nar_str(b"name"))
            out.append(nar_str(name.encode()))
            out.append(nar_str(b"node"))
            nar_node(node[1][name], out)
            out.append(nar_str(b")"))
    else:
        raise ValueError(kind)
    out.append(nar_str(b")"))


def nar(tree) -> bytes:
    out = [nar_str(b"nix-archive-1")]
    nar_node(tree, out)
    return b"".join(out)


# --- contents ------------------------------------------------------------------------

WORDS = (
    "alpha beta gamma delta build store path hash closure deriver output input library "
    "module config option value default system package version release static shared "
    "linker symbol section header source target install prefix runtime data cache"
).split()


def text(rng: Rng, size: int) -> bytes:
    """Compressible text of about `size` bytes."""
    lines, total = [], 0
    while total < size:
        line = " ".join(WORDS[rng.below(len(WORDS))] for _ in range(rng.between(4, 12)))
        line += " %d" % rng.below(100000)
        lines.append(line)
        total += len(line) + 1
    return ("\n".join(lines) + "\n").encode()


def binary(rng: Rng, size: int) -> bytes:
    """Half-random, half-zero bytes (like an object file), `size` bytes."""
    out = bytearray()
    while len(out) < size:
        n = rng.between(16, 256)
        out += rng.bytes(n) if rng.below(2) else b"\0" * n
    return bytes(out[:size])


def make_tree(rng: Rng, name: str, ref_paths: list):
    refs_text = "".join(p + "\n" for p in ref_paths).encode()
    if rng.below(10) < 4:  # a single regular file
        body = b"#!/bin/sh\n# " + name.encode() + b"\n" + refs_text + text(rng, rng.between(1500, 6000))
        return ("regular", body, rng.below(4) == 0)
    lib = "lib%s.so" % name
    entries = {
        "bin": ("directory", {name: ("regular", b"#!/bin/sh\n" + refs_text + text(rng, rng.between(300, 1500)), True)}),
        "lib": ("directory", {
            lib: ("regular", binary(rng, rng.between(1000, 5000)), False),
            lib + ".1": ("symlink", lib.encode()),
        }),
        "share": ("directory", {"doc": ("directory", {"README": ("regular", text(rng, rng.between(200, 1500)), False)})}),
    }
    if ref_paths:
        entries["nix-support"] = ("directory", {"propagated-build-inputs": ("regular", refs_text, False)})
    if rng.below(5) == 0:
        entries["share"][1]["empty"] = ("directory", {})
    return ("directory", entries)


# --- the graph -----------------------------------------------------------------------


def store_path(seed: str, name: str) -> str:
    digest = compress_hash(hashlib.sha256(("arca-synthetic:%s:%s" % (seed, name)).encode()).digest())
    return "%s/%s-%s" % (STORE_DIR, nixbase32(digest), name)


def graph(n: int, depth: int, seed: str):
    """[(name, level, [ref indexes])], the root last."""
    if depth < 1 or n < depth + 1:
        raise SystemExit("need --depth >= 1 and --paths >= depth + 1")
    rng = Rng("graph:%s:%d:%d" % (seed, n, depth))
    per_level = [(n - 1) // depth + (1 if lvl < (n - 1) % depth else 0) for lvl in range(depth)]
    nodes, levels = [], []  # levels[L] = indexes of level L
    for lvl, count in enumerate(per_level):
        idx = []
        for i in range(count):
            idx.append(len(nodes))
            nodes.append(["synth-L%02d-%04d" % (lvl, i), lvl, []])
        levels.append(idx)
    for lvl in range(1, depth):
        below = levels[lvl - 1]
        lower = [i for L in range(lvl) for i in levels[L]]
        # Walk the level below in a shuffled order so that, level by level, each path of
        # level L-1 is someone's first reference where the counts allow it.
        order = sorted(below, key=lambda i: rng.bytes(8))
        for k, i in enumerate(levels[lvl]):
            refs = [order[k % len(order)]]
            want = rng.between(1, 4)
            while len(refs) < want:
                r = lower[rng.below(len(lower))]
                if r not in refs:
                    refs.append(r)
            nodes[i][2] = refs
    referenced = {r for node in nodes for r in node[2]}
    root_refs = [i for i in range(len(nodes)) if i not in referenced]
    nodes.append(["synth-root", depth, root_refs])
    return nodes


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("outdir")
    ap.add_argument("--paths", type=int, default=1000)
    ap.add_argument("--depth", type=int, default=10)
    ap.add_argument("--seed", default="1")
    ap.add_argument("--compression", choices=["none", "xz"], default="none")
    ap.add_argument("--no-deriver", action="store_true", help="omit Deriver lines")
    ap.add_argument("--no-sign", action="store_true", help="write no Sig lines")
    ap.add_argument("--verify-with-nix", type=int, default=0, metavar="K",
                    help="check K NARs against nix-store --restore/--dump and nix-hash")
    ap.add_argument("--check-path-info", metavar="FILE", help="check FILE against OUTDIR/manifest.json; generate nothing")
    args = ap.parse_args()
    if args.check_path_info:
        sys.exit(check_path_info(args.outdir, args.check_path_info))

    signer = None
    if not args.no_sign:
        try:
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
            from cryptography.hazmat.primitives import serialization
        except ImportError:
            print("synthetic_cache: python3 module `cryptography` missing: writing an unsigned cache", file=sys.stderr)
        else:
            sk_seed = hashlib.sha256(("arca-synthetic-key:%s" % args.seed).encode()).digest()
            signer = Ed25519PrivateKey.from_private_bytes(sk_seed)
            pk = signer.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    out = os.path.abspath(args.outdir)
    cache = os.path.join(out, "cache")
    if os.path.exists(cache):
        shutil.rmtree(cache)
    os.makedirs(os.path.join(cache, "nar"))
    for f in ("public-key", "secret-key"):
        if os.path.exists(os.path.join(out, f)):
            os.remove(os.path.join(out, f))
    with open(os.path.join(cache, "nix-cache-info"), "w") as f:
        f.write("StoreDir: %s\nWantMassQuery: 1\nPriority: 40\n" % STORE_DIR)
    if signer is not None:
        with open(os.path.join(out, "secret-key"), "w") as f:
            f.write("%s:%s" % (KEY_NAME, base64.b64encode(sk_seed + pk).decode()))
        with open(os.path.join(out, "public-key"), "w") as f:
            f.write("%s:%s" % (KEY_NAME, base64.b64encode(pk).decode()))

    nodes = graph(args.paths, args.depth, args.seed)
    # The path names depend on the shape too: caches of other sizes never share a store path.
    key = "%s:%d:%d" % (args.seed, args.paths, args.depth)
    paths = [store_path(key, name) for name, _, _ in nodes]
    manifest, nars = [], {}
    for i, (name, level, refs) in enumerate(nodes):
        path = paths[i]
        ref_paths = sorted(paths[r] for r in refs)
        tree = make_tree(Rng("content:%s:%s" % (args.seed, name)), name, ref_paths)
        data = nar(tree)
        nar_hash = "sha256:" + nixbase32(hashlib.sha256(data).digest())
        if args.compression == "xz":
            filedata, ext = lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=6), ".nar.xz"
        else:
            filedata, ext = data, ".nar"
        file_hash = nixbase32(hashlib.sha256(filedata).digest())
        url = "nar/%s%s" % (file_hash, ext)
        with open(os.path.join(cache, url), "wb") as f:
            f.write(filedata)
        base = os.path.basename(path)
        lines = [
            "StorePath: %s" % path,
            "URL: %s" % url,
            "Compression: %s" % args.compression,
            "FileHash: sha256:%s" % file_hash,
            "FileSize: %d" % len(filedata),
            "NarHash: %s" % nar_hash,
            "NarSize: %d" % len(data),
            "References: %s" % " ".join(os.path.basename(p) for p in ref_paths),
        ]
        if not args.no_deriver:
            drv = nixbase32(compress_hash(hashlib.sha256(("arca-synthetic-drv:%s:%s" % (args.seed, name)).encode()).digest()))
            lines.append("Deriver: %s-%s.drv" % (drv, name))
        if signer is not None:
            fp = "1;%s;%s;%d;%s" % (path, nar_hash, len(data), ",".join(ref_paths))
            lines.append("Sig: %s:%s" % (KEY_NAME, base64.b64encode(signer.sign(fp.encode())).decode()))
        with open(os.path.join(cache, base[:32] + ".narinfo"), "w") as f:
            f.write("\n".join(lines) + "\n")
        manifest.append({
            "path": path, "level": level, "narHash": nar_hash,
            "narHashSRI": "sha256-" + base64.b64encode(hashlib.sha256(data).digest()).decode(),
            "narSize": len(data), "references": ref_paths, "url": url, "fileSize": len(filedata),
        })
        nars[path] = data

    root = paths[-1]
    with open(os.path.join(out, "ROOT_PATH"), "w") as f:
        f.write(root + "\n")
    with open(os.path.join(out, "closure.txt"), "w") as f:
        f.write("".join(p + "\n" for p in sorted(paths)))
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump({"root": root, "depth": args.depth, "paths": manifest, "compression": args.compression,
                   "signed": signer is not None}, f, indent=1)

    # Sanity: the closure of the root is everything, and the longest chain is `depth`.
    by_path = {m["path"]: m for m in manifest}
    longest = {}
    for m in manifest:  # nodes are in level order, so references come first
        longest[m["path"]] = 1 + max((longest[r] for r in m["references"]), default=-1)
    seen, todo = set(), [root]
    while todo:
        p = todo.pop()
        if p not in seen:
            seen.add(p)
            todo.extend(by_path[p]["references"])
    assert len(seen) == len(paths) == len(set(paths)), "closure of the root is not every path"
    assert longest[root] == args.depth, (longest[root], args.depth)

    if args.verify_with_nix:
        verify_with_nix(manifest, nars, args.verify_with_nix)

    total = sum(m["narSize"] for m in manifest)
    files = sum(m["fileSize"] for m in manifest)
    print("synthetic cache: %d paths, depth %d, root %s, NAR bytes %d, file bytes %d (%s)%s" % (
        len(paths), args.depth, root, total, files, args.compression, ", signed" if signer else ", unsigned"),
        file=sys.stderr)


def check_path_info(outdir, file):
    with open(os.path.join(outdir, "manifest.json")) as f:
        manifest = {m["path"]: m for m in json.load(f)["paths"]}
    with open(file) as f:
        got = json.load(f)
    if isinstance(got, dict):  # newer Nix: {path: info}
        got = [dict(v or {}, path=k) for k, v in got.items()]
    errors = []
    seen = set()
    for info in got:
        path = info.get("path")
        m = manifest.get(path)
        if m is None:
            errors.append("unexpected path %s" % path)
            continue
        seen.add(path)
        if info.get("narHash") not in (m["narHash"], m["narHashSRI"]):
            errors.append("%s: narHash %s, expected %s" % (path, info.get("narHash"), m["narHashSRI"]))
        if info.get("narSize") != m["narSize"]:
            errors.append("%s: narSize %s, expected %d" % (path, info.get("narSize"), m["narSize"]))
        refs = sorted(r if r.startswith("/") else "%s/%s" % (STORE_DIR, r) for r in info.get("references") or [])
        if refs != m["references"]:
            errors.append("%s: references %s, expected %s" % (path, refs, m["references"]))
    missing = sorted(set(manifest) - seen)
    if missing:
        errors.append("%d paths missing, e.g. %s" % (len(missing), missing[0]))
    if errors:
        print("path-info check of %s: %d problems:\n  %s" % (file, len(errors), "\n  ".join(errors[:10])), file=sys.stderr)
        return 1
    print("path-info check of %s: all %d paths with the cache's NarHash, NarSize and references" % (file, len(seen)),
          file=sys.stderr)
    return 0


def verify_with_nix(manifest, nars, k):
    step = max(1, len(manifest) // k)
    picks = manifest[::step][:k - 1] + [manifest[-1]]
    with tempfile.TemporaryDirectory() as tmp:
        for i, m in enumerate(picks):
            data = nars[m["path"]]
            nar_file = os.path.join(tmp, "%d.nar" % i)
            with open(nar_file, "wb") as f:
                f.write(data)
            target = os.path.join(tmp, "t%d" % i)
            with open(nar_file, "rb") as f:
                subprocess.run(["nix-store", "--restore", target], stdin=f, check=True)
            dumped = subprocess.run(["nix-store", "--dump", target], stdout=subprocess.PIPE, check=True).stdout
            if dumped != data:
                raise SystemExit("NAR of %s differs from nix-store --dump of its restore" % m["path"])
            h = subprocess.run(["nix-hash", "--type", "sha256", "--base32", "--flat", nar_file],
                               stdout=subprocess.PIPE, check=True, text=True).stdout.strip()
            if "sha256:" + h != m["narHash"]:
                raise SystemExit("NarHash of %s: ours %s, nix-hash %s" % (m["path"], m["narHash"], h))
            h2 = subprocess.run(["nix-hash", "--type", "sha256", "--base32", target],
                                stdout=subprocess.PIPE, check=True, text=True).stdout.strip()
            if "sha256:" + h2 != m["narHash"]:
                raise SystemExit("NarHash of %s: ours %s, nix-hash of the tree %s" % (m["path"], m["narHash"], h2))
    print("synthetic cache: %d NARs agree with nix-store --dump and nix-hash" % len(picks), file=sys.stderr)


if __name__ == "__main__":
    main()

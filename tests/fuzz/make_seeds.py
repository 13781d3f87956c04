#!/usr/bin/env python3
"""Writes the seed corpora of fuzz_token, fuzz_base64 and fuzz_journal.

The tokens are well-formed (format: docs/ciphertext-format.md) with
arbitrary nonce/ciphertext/tag bytes: the codec does not decrypt, so the
seeds need no key. The journals are chained audit frames (format:
kms/kms_journal.h). Run from anywhere; rewrites tests/fuzz/corpus/fuzz_*/.
"""
import base64
import hashlib
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def header(kind, name, version):
    n = name.encode()
    return bytes([0x4B, 0x01, kind, len(n)]) + n + struct.pack(">I", version)


def aead(name, version, ct_len):
    return header(1, name, version) + bytes(range(12)) + bytes(ct_len) + bytes([0xEE] * 16)


def mac(name, version):
    return header(2, name, version) + bytes([0x5A] * 32)


def text(b):
    return b"kms1:" + base64.b64encode(b)


def write(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


tokens = {
    "aead-empty.bin": aead("orders", 1, 0),
    "aead-dek.bin": aead("payments.v2_db-key", 7, 32),
    "aead-longname.bin": aead("a" * 128, 0xFFFFFFFF, 5),
    "mac.bin": mac("webhooks", 3),
}
for n, b in tokens.items():
    write("fuzz_token", n, b)
    write("fuzz_token", n.replace(".bin", ".txt"), text(b))
write("fuzz_token", "truncated.bin", aead("orders", 1, 0)[:20])

for n, b in {
    "empty": b"",
    "one.txt": b"Zg==",
    "two.txt": b"Zm8=",
    "three.txt": b"Zm9vYmFy",
    "dek.txt": base64.b64encode(bytes(range(32))),
    "binary.txt": base64.b64encode(bytes(range(256))),
    "bad-pad.txt": b"Zh==",
}.items():
    write("fuzz_base64", n, b)


def journal_frame(seq, prev, rec):
    h = hashlib.sha256(prev + rec).digest()
    body = struct.pack("<4sIQ", b"KRM1", len(rec), seq) + prev + h + rec
    return body + bytes((-len(body)) % 8), h


def journal(first, n, prev=bytes(32)):
    out = b""
    for s in range(first, first + n):
        rec = (
            '{"seq":%d,"time":1700000000,"identity":"app","source":"127.0.0.1:4242",'
            '"request_id":"req-%d","operation":"wrap","key":"orders","version":1,'
            '"to_version":0,"items":0,"status":200,"result":"ok","prev":"%s"}' % (s, s, prev.hex())
        ).encode()
        fr, prev = journal_frame(s, prev, rec)
        out += fr
    return out


write("fuzz_journal", "three-frames.bin", journal(1, 3))
write(
    "fuzz_journal",
    "from-41-torn-tail.bin",
    journal(41, 2, prev=bytes(range(32))) + b"KRM1" + b"\x90\x00\x00\x00" + b"\x5a" * 60,
)
write("fuzz_journal", "empty.bin", b"")

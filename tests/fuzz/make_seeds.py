#!/usr/bin/env python3
"""Writes the seed corpora of fuzz_token, fuzz_base64, fuzz_journal and fuzz_record.

The tokens are well-formed (format: docs/ciphertext-format.md) with
arbitrary nonce/ciphertext/tag bytes: the codec does not decrypt, so the
seeds need no key. The journals are chained audit frames (format:
kms/kms_journal.h). The records are LMDB values and keys (kms/kms_record.c,
format v1, big-endian), each behind the byte that picks its decoder. Run
from anywhere; rewrites tests/fuzz/corpus/fuzz_*/.
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


# fuzz_record: the first byte picks the decoder (0 key, 1 version, 2 master,
# 3 rotation, 4 versions key, 5 masters key).
def u8(v):
    return struct.pack(">B", v)


def u16(v):
    return struct.pack(">H", v)


def u32(v):
    return struct.pack(">I", v)


def u64(v):
    return struct.pack(">Q", v % (1 << 64))


def rstr(s):
    return u16(len(s)) + s


def key_rec(purpose=1, primary=2, latest=3, min_dec=1, period=90 * 86400, protect=1):
    return (u8(1) + u8(purpose) + u32(primary) + u32(latest) + u32(min_dec) + u64(period)
            + u64(7 * 86400) + u8(protect) + u64(1700000000) + u64(1707776000))


def version_rec(state=1, wrapped=bytes(range(60))):
    return (u8(1) + u8(state) + bytes(range(16)) + u32(1) + u64(1700000000) + u64(1700000001)
            + u64(0) + u64(0) + u64(0) + u64(1700000500) + u64(12345) + u16(len(wrapped))
            + wrapped)


def master_rec(state=2):
    return u8(1) + bytes(range(100, 116)) + u8(state) + u64(1700000000) + u64(0)


def rotation_rec(key=b"orders", rtype=3, status=2, reason=b"key compromised"):
    return (u8(1) + b"0123456789abcdef0123456789abcdef" + rstr(key) + u32(1) + u32(2) + u8(rtype)
            + u8(status) + rstr(b"spiffe://kmsd.dev/admin") + u64(1700000000) + u64(1700000042)
            + rstr(reason) + u32(4242))


write("fuzz_record", "key.bin", u8(0) + key_rec())
write("fuzz_record", "key-mac-unprotected.bin", u8(0) + key_rec(purpose=2, primary=1, latest=1, min_dec=0, period=-1, protect=0))
write("fuzz_record", "version-active.bin", u8(1) + version_rec())
write("fuzz_record", "version-destroyed.bin", u8(1) + version_rec(state=5, wrapped=b""))
write("fuzz_record", "master.bin", u8(2) + master_rec())
write("fuzz_record", "rotation-emergency.bin", u8(3) + rotation_rec())
write("fuzz_record", "rotation-master.bin", u8(3) + rotation_rec(key=b"", rtype=5, status=1, reason=b""))
write("fuzz_record", "versions-key.bin", u8(4) + b"orders" + b"\x00" + u32(7))
write("fuzz_record", "masters-key.bin", u8(5) + u32(3))

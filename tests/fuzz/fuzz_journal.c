/*
 * Fuzz target: the audit journal's reader (kms/kms_journal.c), which reads
 * a file that a crash, a torn write or a careless operator may have left
 * in any state.
 *
 * The input is the journal's content (zero-padded to the smallest journal
 * size, cut there); the target opens it alone, so the header is rebuilt
 * from a scan, as at a start after a crash. Invariants:
 *  - the scan's run stays inside the file and ends on a frame boundary;
 *  - walking the frames from the start with kms_journal_frame gives the
 *    same run: consecutive seq, each prev the hash before it, each hash
 *    SHA-256(prev || bytes), each frame inside the file;
 *  - kms_journal_frame at any offset (taken from the input) either refuses
 *    or returns a frame that lies wholly inside its limit.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fuzz_check.h"
#include "kms_hash.h"
#include "kms_journal.h"

/* One scratch directory for the process (the file is rewritten each call),
 * removed at exit. */
static char scratch_dir[] = "/tmp/kms-fuzz-journal-XXXXXX";
static char scratch_file[PATH_MAX], scratch_head[PATH_MAX + 8];

static void scratch_remove(void)
{
    unlink(scratch_file);
    unlink(scratch_head);
    rmdir(scratch_dir);
}

static const char *scratch_path(void)
{
    if (scratch_file[0] == 0) {
        CHECK(mkdtemp(scratch_dir) != NULL);
        snprintf(scratch_file, sizeof(scratch_file), "%s/audit.journal", scratch_dir);
        snprintf(scratch_head, sizeof(scratch_head), "%s.head", scratch_file);
        atexit(scratch_remove);
    }
    return scratch_file;
}

static void check_frame(const kms_jframe *f, uint64_t off, uint64_t limit)
{
    CHECK(f->next > off && f->next <= limit && f->next % 8 == 0);
    CHECK(off + KMS_JOURNAL_FRAME_HEAD + f->len <= f->next);
    uint8_t h[KMS_JOURNAL_HASH_BYTES];
    kms_iov parts[2] = {{f->prev, KMS_JOURNAL_HASH_BYTES}, {f->bytes, f->len}};
    CHECK(kms_is_ok(kms_sha256_iov(parts, 2, h)));
    CHECK(memcmp(h, f->hash, sizeof(h)) == 0);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const uint64_t jsize = KMS_JOURNAL_MIN_BYTES;
    const char *path = scratch_path();
    unlink(scratch_head);
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    CHECK(fd >= 0);
    uint8_t *buf = calloc(1, jsize);
    CHECK(buf != NULL);
    memcpy(buf, data, size < jsize ? size : jsize);
    CHECK(pwrite(fd, buf, jsize, 0) == (ssize_t)jsize);
    close(fd);
    free(buf);

    kms_journal *j = NULL;
    CHECK(kms_is_ok(kms_journal_open(path, jsize, &j)));
    kms_jscan s;
    kms_journal_scan(j, &s);
    CHECK(s.end <= jsize && s.end % 8 == 0);
    CHECK(s.n == 0 ? s.end == KMS_JOURNAL_DATA_OFF : s.last_seq == s.first_seq + s.n - 1);

    /* The same run, walked frame by frame. */
    uint64_t off = KMS_JOURNAL_DATA_OFF, n = 0, seq = 0;
    uint8_t prev[KMS_JOURNAL_HASH_BYTES];
    kms_jframe f;
    while (n < s.n) {
        CHECK(kms_journal_frame(j, off, jsize, &f));
        check_frame(&f, off, jsize);
        if (n > 0) {
            CHECK(f.seq == seq + 1);
            CHECK(memcmp(f.prev, prev, sizeof(prev)) == 0);
        } else {
            CHECK(f.seq == s.first_seq);
        }
        seq = f.seq;
        memcpy(prev, f.hash, sizeof(prev));
        off = f.next;
        n++;
    }
    CHECK(off == s.end);
    if (s.n > 0) {
        CHECK(seq == s.last_seq);
        CHECK(memcmp(prev, s.last_hash, sizeof(prev)) == 0);
    }

    /* Any offset, any limit: refused, or a whole frame inside the limit. */
    for (size_t i = 0; i + 16 <= size && i < 256; i += 16) {
        uint64_t at, limit;
        memcpy(&at, data + i, 8);
        memcpy(&limit, data + i + 8, 8);
        at %= jsize + 64;
        limit %= jsize + 4096;
        if (kms_journal_frame(j, at, limit, &f))
            check_frame(&f, at, limit < jsize ? limit : jsize);
    }
    kms_journal_close(j);
    return 0;
}

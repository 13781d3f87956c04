/*
 * The data operations. Each costs about one HSM call: metadata comes from
 * the in-memory cache, nothing is written to LMDB except the occasional
 * counter reservation, and the token is never searched.
 *
 * Token (crypto/kms_token.h): header = magic | format | kind | name | version;
 * AEAD tokens are header | nonce (12) | ciphertext | tag (16), with the GCM
 * AAD = header || context, so that a token moved to another key or version,
 * or presented with another context, fails the tag check. MAC tokens are
 * header | HMAC-SHA-256(header || message).
 */
#include "kms_internal.h"

#include "kms_rand.h"
#include "kms_secmem.h"

#include <stdio.h>
#include <string.h>

#define KMS_AAD_MAX_BYTES (KMS_TOKEN_HEADER_MAX_BYTES + KMS_CONTEXT_MAX_BYTES)

static kms_result kms_ctx_check(const uint8_t *ctx, size_t ctx_len)
{
    KMS_ENSURE(ctx != NULL || ctx_len == 0, KMS_ERR_INVALID_ARGUMENT);
    KMS_ENSURE_MSG(ctx_len <= KMS_CONTEXT_MAX_BYTES, KMS_ERR_LIMIT_EXCEEDED,
                   "context is limited to %d bytes", KMS_CONTEXT_MAX_BYTES);
    return KMS_OK_RESULT;
}

/* The key exists and serves this purpose. */
static kms_result kms_key_for(kms *k, const char *name, kms_purpose purpose, kms_use *u)
{
    KMS_GUARD(kms_cache_use(k, name, 0, u));
    KMS_ENSURE_MSG(u->purpose == (uint8_t)purpose, KMS_ERR_KEY_PURPOSE, "key %s is for %s", name,
                   kms_purpose_name((kms_purpose)u->purpose));
    return KMS_OK_RESULT;
}

static void kms_deprecated_note(kms *k, const char *name, kms_use *u, int64_t now)
{
    kms_ver *v = u->ver;
    uint64_t uses = atomic_fetch_add(&v->deprecated_uses, 1) + 1;
    int64_t last = atomic_load(&v->last_warned);
    /* At most one warning a minute per version. */
    if (now - last >= KMS_DEPRECATED_WARN_EVERY_S &&
        atomic_compare_exchange_strong(&v->last_warned, &last, now))
        fprintf(stderr,
                "kms: warning: key %s version %u is deprecated (grace until %lld) and still "
                "used: %llu uses so far\n",
                name, u->version, (long long)u->rec.grace_until, (unsigned long long)uses);
}

/* May the version in u be read (decrypt, unwrap, rewrap source, verify)?
 * States first, then min_decryption_version. */
static kms_result kms_read_check(kms *k, const kms_caller *c, const char *name, kms_use *u,
                                 bool rewrap)
{
    int64_t now = kms_now(k);
    if (kms_version_destroy_due(&u->rec, now)) {
        KMS_GUARD(kms_version_destroy_now(k, name, u->version));
        KMS_BAIL(KMS_ERR_VERSION_DESTROYED);
    }
    switch (kms_version_effective(&u->rec, now)) {
    case KMS_VERSION_ACTIVE:
        break;
    case KMS_VERSION_DEPRECATED:
        kms_deprecated_note(k, name, u, now);
        break;
    case KMS_VERSION_COMPROMISED:
        /* Only the migration role's rewrap may read it, to move data off. */
        KMS_ENSURE(rewrap && c->may_read_compromised, KMS_ERR_VERSION_COMPROMISED);
        break;
    case KMS_VERSION_DISABLED:
        KMS_BAIL(KMS_ERR_VERSION_DISABLED);
    case KMS_VERSION_DESTROYED:
        KMS_BAIL(KMS_ERR_VERSION_DESTROYED);
    default:
        KMS_BAIL(KMS_ERR_INTERNAL);
    }
    KMS_ENSURE(u->version >= u->min_decryption_version, KMS_ERR_VERSION_BELOW_MINIMUM);
    return KMS_OK_RESULT;
}

/* A version's blob, as this operation read it from the cache, can name a
 * master that a master rotation in another process has just destroyed
 * (after rewrapping the blob and bumping the cache generation). Resolving
 * the version again reloads it; the caller then retries once. */
static bool kms_use_reresolved(kms *k, const char *name, kms_result r, kms_use *u)
{
    return r.err == KMS_ERR_HSM_OBJECT_MISSING && kms_is_ok(kms_cache_use(k, name, u->version, u));
}

/* Encrypts pt under the primary version u and appends the binary token. */
static kms_result kms_seal(kms *k, const char *name, kms_use *u, const uint8_t *pt, size_t pt_len,
                           const uint8_t *ctx, size_t ctx_len, kms_buf *out)
{
    /* The primary can never be anything but active (kms_version_set_state
     * refuses every change of the primary), but a destruction or grace
     * coming due must still not let it encrypt. */
    KMS_ENSURE(kms_version_effective(&u->rec, kms_now(k)) == KMS_VERSION_ACTIVE,
               KMS_ERR_VERSION_DISABLED);
    KMS_GUARD(kms_counter_take(k, name, u));
    size_t start = out->len;
    uint8_t aad[KMS_AAD_MAX_BYTES];
    kms_result r = kms_token_header_write(KMS_TOKEN_KIND_AEAD, name, u->version, out);
    if (kms_is_ok(r)) {
        size_t hlen = out->len - start;
        memcpy(aad, out->data + start, hlen);
        if (ctx_len > 0)
            memcpy(aad + hlen, ctx, ctx_len);
        uint8_t *p = NULL;
        r = kms_buf_extend(out, KMS_TOKEN_NONCE_BYTES + pt_len + KMS_TOKEN_TAG_BYTES, &p);
        /* NIST SP 800-38D 8.2.2: a random 96-bit IV per invocation; the
         * invocation count is bounded by the counter taken above. */
        if (kms_is_ok(r))
            r = kms_rand_nonce(p, KMS_TOKEN_NONCE_BYTES);
        if (kms_is_ok(r))
            r = kms_hsm_aead_encrypt(k->hsm, &u->ref, p, aad, hlen + ctx_len, pt, pt_len,
                                     p + KMS_TOKEN_NONCE_BYTES);
        if (kms_use_reresolved(k, name, r, u))
            r = kms_hsm_aead_encrypt(k->hsm, &u->ref, p, aad, hlen + ctx_len, pt, pt_len,
                                     p + KMS_TOKEN_NONCE_BYTES);
    }
    if (!kms_is_ok(r))
        kms_buf_truncate(out, start);
    return r;
}

/* Parses and authenticates an AEAD token for `name`; appends the plaintext. */
static kms_result kms_unseal(kms *k, const kms_caller *c, const char *name, const uint8_t *tok,
                             size_t tok_len, const uint8_t *ctx, size_t ctx_len, bool rewrap,
                             kms_buf *pt_out, kms_use *u, kms_buf *scratch, kms_token *t)
{
    KMS_ENSURE(tok != NULL || tok_len == 0, KMS_ERR_INVALID_ARGUMENT);
    KMS_GUARD(kms_token_parse_any(tok, tok_len, scratch, t));
    /* Another key's token gives the same error as a tampered one. */
    KMS_ENSURE(t->kind == KMS_TOKEN_KIND_AEAD && strcmp(t->key_name, name) == 0 &&
                   t->ciphertext_len > 0,
               KMS_ERR_TOKEN_INVALID);
    /* An unknown version of the right key is VERSION_NOT_FOUND: more
     * useful to the caller, and it tells an attacker nothing they could not
     * read from the token's clear header. */
    KMS_GUARD(kms_cache_use(k, name, t->key_version, u));
    KMS_GUARD(kms_read_check(k, c, name, u, rewrap));
    uint8_t aad[KMS_AAD_MAX_BYTES];
    memcpy(aad, t->header, t->header_len);
    if (ctx_len > 0)
        memcpy(aad + t->header_len, ctx, ctx_len);
    size_t start = pt_out->len;
    uint8_t *p = NULL;
    KMS_GUARD(kms_buf_extend(pt_out, t->ciphertext_len, &p));
    /* The ciphertext and tag are contiguous in the token. */
    kms_result r = kms_hsm_aead_decrypt(k->hsm, &u->ref, t->nonce, aad, t->header_len + ctx_len,
                                        t->ciphertext, t->ciphertext_len + KMS_TOKEN_TAG_BYTES, p);
    if (kms_use_reresolved(k, name, r, u))
        r = kms_hsm_aead_decrypt(k->hsm, &u->ref, t->nonce, aad, t->header_len + ctx_len,
                                 t->ciphertext, t->ciphertext_len + KMS_TOKEN_TAG_BYTES, p);
    if (!kms_is_ok(r)) {
        kms_buf_truncate(pt_out, start);
        return r;
    }
    int64_t now = kms_now(k);
    if (atomic_load_explicit(&u->ver->last_used, memory_order_relaxed) < now)
        atomic_store_explicit(&u->ver->last_used, now, memory_order_relaxed);
    return KMS_OK_RESULT;
}

static kms_result kms_seal_op(kms *k, const kms_caller *c, const char *name, const uint8_t *pt,
                              size_t pt_len, size_t min, size_t max, const uint8_t *ctx,
                              size_t ctx_len, kms_buf *token_out, uint32_t *version)
{
    KMS_ENSURE(k != NULL && c != NULL && token_out != NULL, KMS_ERR_INVALID_ARGUMENT);
    KMS_ENSURE(pt != NULL || pt_len == 0, KMS_ERR_INVALID_ARGUMENT);
    KMS_ENSURE(pt_len >= min, KMS_ERR_INVALID_ARGUMENT);
    KMS_ENSURE_MSG(pt_len <= max, KMS_ERR_LIMIT_EXCEEDED, "plaintext is limited to %zu bytes", max);
    KMS_GUARD(kms_ctx_check(ctx, ctx_len));
    kms_use u;
    KMS_GUARD(kms_key_for(k, name, KMS_PURPOSE_ENCRYPT, &u));
    KMS_GUARD(kms_seal(k, name, &u, pt, pt_len, ctx, ctx_len, token_out));
    if (version != NULL)
        *version = u.version;
    return KMS_OK_RESULT;
}

static kms_result kms_unseal_op(kms *k, const kms_caller *c, const char *name, const uint8_t *tok,
                                size_t tok_len, const uint8_t *ctx, size_t ctx_len, kms_buf *pt_out,
                                uint32_t *version)
{
    KMS_ENSURE(k != NULL && c != NULL && pt_out != NULL, KMS_ERR_INVALID_ARGUMENT);
    KMS_GUARD(kms_ctx_check(ctx, ctx_len));
    kms_use u;
    KMS_GUARD(kms_key_for(k, name, KMS_PURPOSE_ENCRYPT, &u));
    kms_buf scratch KMS_DEFER(kms_buf_cleanup) = {0};
    kms_token t;
    KMS_GUARD(kms_unseal(k, c, name, tok, tok_len, ctx, ctx_len, false, pt_out, &u, &scratch, &t));
    if (version != NULL)
        *version = u.version;
    return KMS_OK_RESULT;
}

KMS_RESULT kms_wrap(kms *k, const kms_caller *c, const char *name, const uint8_t *pt, size_t pt_len,
                    const uint8_t *ctx, size_t ctx_len, kms_buf *token_out, uint32_t *version)
{
    return kms_seal_op(k, c, name, pt, pt_len, KMS_WRAP_PLAINTEXT_MIN_BYTES,
                       KMS_WRAP_PLAINTEXT_MAX_BYTES, ctx, ctx_len, token_out, version);
}

KMS_RESULT kms_unwrap(kms *k, const kms_caller *c, const char *name, const uint8_t *token,
                      size_t token_len, const uint8_t *ctx, size_t ctx_len, kms_buf *pt_out,
                      uint32_t *version)
{
    return kms_unseal_op(k, c, name, token, token_len, ctx, ctx_len, pt_out, version);
}

KMS_RESULT kms_encrypt(kms *k, const kms_caller *c, const char *name, const uint8_t *pt,
                       size_t pt_len, const uint8_t *ctx, size_t ctx_len, kms_buf *token_out,
                       uint32_t *version)
{
    return kms_seal_op(k, c, name, pt, pt_len, 1, KMS_ENCRYPT_PLAINTEXT_MAX_BYTES, ctx, ctx_len,
                       token_out, version);
}

KMS_RESULT kms_decrypt(kms *k, const kms_caller *c, const char *name, const uint8_t *token,
                       size_t token_len, const uint8_t *ctx, size_t ctx_len, kms_buf *pt_out,
                       uint32_t *version)
{
    return kms_unseal_op(k, c, name, token, token_len, ctx, ctx_len, pt_out, version);
}

KMS_RESULT kms_datakey(kms *k, const kms_caller *c, const char *name, size_t len,
                       const uint8_t *ctx, size_t ctx_len, kms_buf *token_out, kms_buf *pt_out,
                       uint32_t *version)
{
    KMS_ENSURE(k != NULL && c != NULL && token_out != NULL, KMS_ERR_INVALID_ARGUMENT);
    KMS_ENSURE_MSG(len >= KMS_DATAKEY_MIN_BYTES && len <= KMS_DATAKEY_MAX_BYTES,
                   KMS_ERR_INVALID_ARGUMENT, "data keys are %d to %d bytes", KMS_DATAKEY_MIN_BYTES,
                   KMS_DATAKEY_MAX_BYTES);
    KMS_GUARD(kms_ctx_check(ctx, ctx_len));
    kms_use u;
    KMS_GUARD(kms_key_for(k, name, KMS_PURPOSE_ENCRYPT, &u));
    kms_buf dek KMS_DEFER(kms_buf_cleanup);
    kms_buf_init_secret(&dek, KMS_DATAKEY_MAX_BYTES);
    uint8_t *p = NULL;
    KMS_GUARD(kms_buf_extend(&dek, len, &p));
    KMS_GUARD(kms_hsm_random(k->hsm, p, len));
    size_t tstart = token_out->len;
    KMS_GUARD(kms_seal(k, name, &u, dek.data, dek.len, ctx, ctx_len, token_out));
    if (pt_out != NULL) {
        kms_result r = kms_buf_append(pt_out, dek.data, dek.len);
        if (!kms_is_ok(r)) {
            kms_buf_truncate(token_out, tstart);
            return r;
        }
    }
    if (version != NULL)
        *version = u.version;
    return KMS_OK_RESULT;
}

KMS_RESULT kms_rewrap(kms *k, const kms_caller *c, const char *name, const uint8_t *token,
                      size_t token_len, const uint8_t *ctx, size_t ctx_len, kms_buf *token_out,
                      uint32_t *from_version, uint32_t *to_version, bool *changed)
{
    KMS_ENSURE(k != NULL && c != NULL && token_out != NULL, KMS_ERR_INVALID_ARGUMENT);
    KMS_ENSURE(token != NULL || token_len == 0, KMS_ERR_INVALID_ARGUMENT);
    KMS_GUARD(kms_ctx_check(ctx, ctx_len));
    kms_use prim;
    KMS_GUARD(kms_key_for(k, name, KMS_PURPOSE_ENCRYPT, &prim));
    kms_buf scratch KMS_DEFER(kms_buf_cleanup) = {0};
    kms_token t;
    KMS_GUARD(kms_token_parse_any(token, token_len, &scratch, &t));
    KMS_ENSURE(t.kind == KMS_TOKEN_KIND_AEAD && strcmp(t.key_name, name) == 0 &&
                   t.ciphertext_len > 0,
               KMS_ERR_TOKEN_INVALID);
    if (t.key_version == prim.version) {
        /* Already under the primary: returned as it is, no HSM call. */
        size_t bin_len =
            t.header_len + KMS_TOKEN_NONCE_BYTES + t.ciphertext_len + KMS_TOKEN_TAG_BYTES;
        KMS_GUARD(kms_buf_append(token_out, t.header, bin_len));
        if (from_version != NULL)
            *from_version = prim.version;
        if (to_version != NULL)
            *to_version = prim.version;
        if (changed != NULL)
            *changed = false;
        return KMS_OK_RESULT;
    }
    /* The plaintext exists only here, in secret memory, and is wiped. */
    kms_buf pt KMS_DEFER(kms_buf_cleanup);
    kms_buf_init_secret(&pt, KMS_TOKEN_PLAINTEXT_MAX_BYTES);
    kms_use src;
    kms_buf scratch2 KMS_DEFER(kms_buf_cleanup) = {0};
    kms_token t2;
    KMS_GUARD(
        kms_unseal(k, c, name, token, token_len, ctx, ctx_len, true, &pt, &src, &scratch2, &t2));
    KMS_GUARD(kms_seal(k, name, &prim, pt.data, pt.len, ctx, ctx_len, token_out));
    if (from_version != NULL)
        *from_version = src.version;
    if (to_version != NULL)
        *to_version = prim.version;
    if (changed != NULL)
        *changed = true;
    return KMS_OK_RESULT;
}

static kms_result kms_mac_compute(kms *k, const char *name, kms_use *u, const uint8_t *header,
                                  size_t header_len, const uint8_t *msg, size_t msg_len,
                                  uint8_t out[KMS_HSM_MAC_BYTES])
{
    kms_iov parts[2] = {{header, header_len}, {msg, msg_len}};
    kms_result r = kms_hsm_mac_sign(k->hsm, &u->ref, parts, 2, out);
    if (kms_use_reresolved(k, name, r, u))
        r = kms_hsm_mac_sign(k->hsm, &u->ref, parts, 2, out);
    KMS_GUARD(r);
    int64_t now = kms_now(k);
    if (atomic_load_explicit(&u->ver->last_used, memory_order_relaxed) < now)
        atomic_store_explicit(&u->ver->last_used, now, memory_order_relaxed);
    return KMS_OK_RESULT;
}

KMS_RESULT kms_mac(kms *k, const kms_caller *c, const char *name, const uint8_t *msg,
                   size_t msg_len, kms_buf *mac_out, uint32_t *version)
{
    KMS_ENSURE(k != NULL && c != NULL && mac_out != NULL, KMS_ERR_INVALID_ARGUMENT);
    KMS_ENSURE(msg != NULL || msg_len == 0, KMS_ERR_INVALID_ARGUMENT);
    KMS_ENSURE(msg_len <= KMS_MAC_MESSAGE_MAX_BYTES, KMS_ERR_LIMIT_EXCEEDED);
    kms_use u;
    KMS_GUARD(kms_key_for(k, name, KMS_PURPOSE_MAC, &u));
    KMS_ENSURE(kms_version_effective(&u.rec, kms_now(k)) == KMS_VERSION_ACTIVE,
               KMS_ERR_VERSION_DISABLED);
    size_t start = mac_out->len;
    uint8_t header[KMS_TOKEN_HEADER_MAX_BYTES];
    kms_result r = kms_token_header_write(KMS_TOKEN_KIND_MAC, name, u.version, mac_out);
    uint8_t *p = NULL;
    if (kms_is_ok(r)) {
        size_t hlen = mac_out->len - start;
        memcpy(header, mac_out->data + start, hlen);
        r = kms_buf_extend(mac_out, KMS_HSM_MAC_BYTES, &p);
        if (kms_is_ok(r))
            r = kms_mac_compute(k, name, &u, header, hlen, msg, msg_len, p);
    }
    if (!kms_is_ok(r)) {
        kms_buf_truncate(mac_out, start);
        return r;
    }
    if (version != NULL)
        *version = u.version;
    return KMS_OK_RESULT;
}

KMS_RESULT kms_verify(kms *k, const kms_caller *c, const char *name, const uint8_t *msg,
                      size_t msg_len, const uint8_t *mac, size_t mac_len, bool *valid,
                      uint32_t *version)
{
    KMS_ENSURE(k != NULL && c != NULL && valid != NULL, KMS_ERR_INVALID_ARGUMENT);
    KMS_ENSURE(msg != NULL || msg_len == 0, KMS_ERR_INVALID_ARGUMENT);
    KMS_ENSURE(mac != NULL || mac_len == 0, KMS_ERR_INVALID_ARGUMENT);
    KMS_ENSURE(msg_len <= KMS_MAC_MESSAGE_MAX_BYTES, KMS_ERR_LIMIT_EXCEEDED);
    *valid = false;
    kms_use u;
    KMS_GUARD(kms_key_for(k, name, KMS_PURPOSE_MAC, &u));
    kms_buf scratch KMS_DEFER(kms_buf_cleanup) = {0};
    kms_token t;
    KMS_GUARD(kms_token_parse_any(mac, mac_len, &scratch, &t));
    KMS_ENSURE(t.kind == KMS_TOKEN_KIND_MAC && strcmp(t.key_name, name) == 0,
               KMS_ERR_TOKEN_INVALID);
    KMS_GUARD(kms_cache_use(k, name, t.key_version, &u));
    KMS_GUARD(kms_read_check(k, c, name, &u, false));
    uint8_t expect[KMS_HSM_MAC_BYTES];
    KMS_GUARD(kms_mac_compute(k, name, &u, t.header, t.header_len, msg, msg_len, expect));
    /* A wrong MAC is an answer, not an error; compared in constant time. */
    *valid = kms_ct_equal(expect, t.tag, KMS_HSM_MAC_BYTES);
    kms_secmem_wipe(expect, sizeof(expect));
    if (version != NULL)
        *version = u.version;
    return KMS_OK_RESULT;
}

/* ---------------------------------------------------------------------- */
/* Batch                                                                   */

static kms_result kms_batch_one(kms *k, const kms_caller *c, kms_op op, const char *name,
                                const kms_batch_item *it, kms_batch_result *res)
{
    switch (op) {
    case KMS_OP_WRAP:
        return kms_wrap(k, c, name, it->in, it->in_len, it->ctx, it->ctx_len, &res->out,
                        &res->version);
    case KMS_OP_UNWRAP:
        return kms_unwrap(k, c, name, it->in, it->in_len, it->ctx, it->ctx_len, &res->out,
                          &res->version);
    case KMS_OP_ENCRYPT:
        return kms_encrypt(k, c, name, it->in, it->in_len, it->ctx, it->ctx_len, &res->out,
                           &res->version);
    case KMS_OP_DECRYPT:
        return kms_decrypt(k, c, name, it->in, it->in_len, it->ctx, it->ctx_len, &res->out,
                           &res->version);
    case KMS_OP_REWRAP:
        return kms_rewrap(k, c, name, it->in, it->in_len, it->ctx, it->ctx_len, &res->out,
                          &res->from_version, &res->version, &res->flag);
    case KMS_OP_DATAKEY:
        /* One output per item: the wrapped data key (see docs). */
        return kms_datakey(k, c, name, it->datakey_len, it->ctx, it->ctx_len, &res->out, NULL,
                           &res->version);
    case KMS_OP_MAC:
        return kms_mac(k, c, name, it->in, it->in_len, &res->out, &res->version);
    case KMS_OP_VERIFY:
        return kms_verify(k, c, name, it->in, it->in_len, it->ctx, it->ctx_len, &res->flag,
                          &res->version);
    default:
        KMS_BAIL(KMS_ERR_INVALID_ARGUMENT);
    }
}

KMS_RESULT kms_batch(kms *k, const kms_caller *c, kms_op op, const char *name,
                     const kms_batch_item *items, size_t n, kms_batch_result *results)
{
    KMS_ENSURE(k != NULL && c != NULL, KMS_ERR_INVALID_ARGUMENT);
    KMS_ENSURE(op >= KMS_OP_WRAP && op <= KMS_OP_VERIFY, KMS_ERR_INVALID_ARGUMENT);
    KMS_ENSURE_MSG(n <= KMS_BATCH_MAX_ITEMS, KMS_ERR_LIMIT_EXCEEDED,
                   "a batch holds at most %d items", KMS_BATCH_MAX_ITEMS);
    KMS_ENSURE(n == 0 || (items != NULL && results != NULL), KMS_ERR_INVALID_ARGUMENT);
    kms_purpose want =
        (op == KMS_OP_MAC || op == KMS_OP_VERIFY) ? KMS_PURPOSE_MAC : KMS_PURPOSE_ENCRYPT;
    kms_use u;
    KMS_GUARD(kms_key_for(k, name, want, &u));
    bool secret_out = op == KMS_OP_UNWRAP || op == KMS_OP_DECRYPT;
    for (size_t i = 0; i < n; i++) {
        kms_batch_result *res = &results[i];
        if (secret_out)
            kms_buf_init_secret(&res->out, KMS_TOKEN_PLAINTEXT_MAX_BYTES);
        else
            kms_buf_init(&res->out, KMS_TOKEN_BINARY_MAX_BYTES);
        kms_result r = kms_batch_one(k, c, op, name, &items[i], res);
        res->err = r.err;
        if (!kms_is_ok(r)) {
            kms_buf_free(&res->out);
            res->version = 0;
            res->from_version = 0;
            res->flag = false;
        }
    }
    kms_error_clear();
    return KMS_OK_RESULT;
}

void kms_batch_results_free(kms_batch_result *results, size_t n)
{
    if (results == NULL)
        return;
    for (size_t i = 0; i < n; i++)
        kms_buf_free(&results[i].out);
}

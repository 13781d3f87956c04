/*
 * TLS material of the server: the server certificate chain and key handed
 * to GnuTLS through a retrieve callback (so that SIGHUP can swap them for
 * new handshakes without touching the listener), and the client-certificate
 * check done with OpenSSL, since libmicrohttpd only requests the certificate
 * and verifies nothing.
 */
#include "kms_api_tls.h"
#include "kms.h"
#include "kms_api.h"
#include "kms_secmem.h"

#include <errno.h>
#include <gnutls/abstract.h>
#include <gnutls/gnutls.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

/* ---- server certificate ---- */

#define CERT_CHAIN_MAX 8

typedef struct cert_bundle {
    gnutls_pcert_st pcert[CERT_CHAIN_MAX];
    unsigned count;
    gnutls_privkey_t key;
    struct cert_bundle *older; /* superseded bundles, freed at shutdown */
} cert_bundle;

/* GnuTLS keeps pointers into the bundle chosen for a session for the
 * session's lifetime, and the retrieve callback has no user pointer: the
 * current bundle is process-wide, and superseded ones stay allocated until
 * kms_api_tls_free(). A reload is a rare operator action, so this is a few
 * kilobytes per SIGHUP. */
static pthread_mutex_t cert_lock = PTHREAD_MUTEX_INITIALIZER;
static cert_bundle *cert_current;

static void bundle_free(cert_bundle *b)
{
    while (b != NULL) {
        cert_bundle *next = b->older;
        for (unsigned i = 0; i < b->count; i++) {
            gnutls_pcert_deinit(&b->pcert[i]);
        }
        if (b->key != NULL) {
            gnutls_privkey_deinit(b->key);
        }
        free(b);
        b = next;
    }
}

KMS_RESULT kms_api_key_file_check(const char *path)
{
    struct stat st;
    KMS_ENSURE_MSG(stat(path, &st) == 0, KMS_ERR_CONFIG, "%s: %s", path, strerror(errno));
    KMS_ENSURE_MSG((st.st_mode & (S_IRWXG | S_IRWXO)) == 0, KMS_ERR_CONFIG,
                   "%s: readable by group or others (chmod 600)", path);
    return KMS_OK_RESULT;
}

/* Compares the certificate's public key with the private key's, so that a
 * mismatched pair is refused at load instead of failing every handshake. */
static bool key_matches(gnutls_pcert_st *leaf, gnutls_privkey_t key)
{
    gnutls_pubkey_t pub = NULL;
    gnutls_datum_t a = {0}, b = {0};
    bool ok = false;
    if (gnutls_pubkey_init(&pub) == 0 && gnutls_pubkey_import_privkey(pub, key, 0, 0) == 0 &&
        gnutls_pubkey_export2(pub, GNUTLS_X509_FMT_DER, &a) == 0 &&
        gnutls_pubkey_export2(leaf->pubkey, GNUTLS_X509_FMT_DER, &b) == 0) {
        ok = a.size == b.size && memcmp(a.data, b.data, a.size) == 0;
    }
    gnutls_free(a.data);
    gnutls_free(b.data);
    if (pub != NULL) {
        gnutls_pubkey_deinit(pub);
    }
    return ok;
}

static kms_result bundle_load(const char *cert_path, const char *key_path, cert_bundle **out)
{
    KMS_GUARD(kms_api_key_file_check(key_path));
    cert_bundle *b = calloc(1, sizeof(*b));
    KMS_ENSURE(b != NULL, KMS_ERR_NO_MEMORY);
    gnutls_datum_t cert = {0}, key = {0};
    kms_result res = KMS_OK_RESULT;
    int rc;
    if ((rc = gnutls_load_file(cert_path, &cert)) < 0) {
        res = kms_error_raisef(KMS_ERR_CONFIG, __FILE__, __LINE__, "%s: %s", cert_path,
                               gnutls_strerror(rc));
        goto done;
    }
    b->count = CERT_CHAIN_MAX;
    if ((rc = gnutls_pcert_list_import_x509_raw(b->pcert, &b->count, &cert, GNUTLS_X509_FMT_PEM,
                                                0)) < 0) {
        b->count = 0;
        res = kms_error_raisef(KMS_ERR_CONFIG, __FILE__, __LINE__, "%s: %s", cert_path,
                               gnutls_strerror(rc));
        goto done;
    }
    if ((rc = gnutls_load_file(key_path, &key)) < 0 || (rc = gnutls_privkey_init(&b->key)) < 0 ||
        (rc = gnutls_privkey_import_x509_raw(b->key, &key, GNUTLS_X509_FMT_PEM, NULL, 0)) < 0) {
        res = kms_error_raisef(KMS_ERR_CONFIG, __FILE__, __LINE__, "%s: %s", key_path,
                               gnutls_strerror(rc));
        goto done;
    }
    if (!key_matches(&b->pcert[0], b->key)) {
        res = kms_error_raisef(KMS_ERR_CONFIG, __FILE__, __LINE__,
                               "%s does not belong to the certificate in %s", key_path, cert_path);
        goto done;
    }
done:
    gnutls_free(cert.data);
    if (key.data != NULL) {
        kms_secmem_wipe(key.data, key.size);
        gnutls_free(key.data);
    }
    if (!kms_is_ok(res)) {
        bundle_free(b);
        return res;
    }
    *out = b;
    return KMS_OK_RESULT;
}

KMS_RESULT kms_api_tls_cert_load(const char *cert_path, const char *key_path)
{
    cert_bundle *b = NULL;
    KMS_GUARD(bundle_load(cert_path, key_path, &b));
    pthread_mutex_lock(&cert_lock);
    b->older = cert_current;
    cert_current = b;
    pthread_mutex_unlock(&cert_lock);
    return KMS_OK_RESULT;
}

int kms_api_tls_cert_retrieve(gnutls_session_t session, const gnutls_datum_t *req_ca_rdn, int nreqs,
                              const gnutls_pk_algorithm_t *pk_algos, int pk_algos_length,
                              gnutls_pcert_st **pcert, unsigned int *pcert_length,
                              gnutls_privkey_t *privkey)
{
    pthread_mutex_lock(&cert_lock);
    cert_bundle *b = cert_current;
    pthread_mutex_unlock(&cert_lock);
    if (b == NULL) {
        return -1;
    }
    *pcert = b->pcert;
    *pcert_length = b->count;
    *privkey = b->key;
    return 0;
}

/* ---- client certificates ---- */

struct kms_api_trust {
    X509_STORE *store;
    bool crl;
};

void kms_api_trust_free(kms_api_trust *t)
{
    if (t == NULL) {
        return;
    }
    X509_STORE_free(t->store);
    free(t);
}

KMS_RESULT kms_api_trust_load(const char *ca_path, const char *crl_path, kms_api_trust **out)
{
    kms_api_trust *t = calloc(1, sizeof(*t));
    KMS_ENSURE(t != NULL, KMS_ERR_NO_MEMORY);
    t->store = X509_STORE_new();
    if (t->store == NULL || X509_STORE_load_file(t->store, ca_path) != 1) {
        ERR_clear_error();
        kms_api_trust_free(t);
        KMS_BAIL_MSG(KMS_ERR_CONFIG, "%s: no CA certificate could be read", ca_path);
    }
    if (crl_path != NULL && crl_path[0] != '\0') {
        FILE *f = fopen(crl_path, "re");
        X509_CRL *crl = f != NULL ? PEM_read_X509_CRL(f, NULL, NULL, NULL) : NULL;
        if (f != NULL) {
            fclose(f);
        }
        if (crl == NULL || X509_STORE_add_crl(t->store, crl) != 1) {
            X509_CRL_free(crl);
            ERR_clear_error();
            kms_api_trust_free(t);
            KMS_BAIL_MSG(KMS_ERR_CONFIG, "%s: not a PEM CRL", crl_path);
        }
        X509_CRL_free(crl);
        t->crl = true;
    }
    *out = t;
    return KMS_OK_RESULT;
}

static const char *verify_reason(int err)
{
    switch (err) {
    case X509_V_ERR_CERT_HAS_EXPIRED:
        return "certificate expired";
    case X509_V_ERR_CERT_NOT_YET_VALID:
        return "certificate not yet valid";
    case X509_V_ERR_CERT_REVOKED:
        return "certificate revoked";
    case X509_V_ERR_INVALID_PURPOSE:
        return "certificate not valid for TLS client authentication";
    case X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT:
    case X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY:
    case X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE:
    case X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT:
    case X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN:
    case X509_V_ERR_CERT_SIGNATURE_FAILURE:
        return "certificate not issued by the trusted CA";
    case X509_V_ERR_UNABLE_TO_GET_CRL:
    case X509_V_ERR_CRL_HAS_EXPIRED:
    case X509_V_ERR_CRL_NOT_YET_VALID:
    case X509_V_ERR_CRL_SIGNATURE_FAILURE:
        return "certificate revocation status unknown (CRL missing or out of date)";
    default:
        return "certificate rejected";
    }
}

/* Identities are printable ASCII without blanks: they go into logs, the
 * audit trail and policy globs. */
static bool identity_copy(const unsigned char *s, int n, char *out, size_t cap)
{
    if (n <= 0 || (size_t)n >= cap || (size_t)n > KMS_IDENTITY_MAX_BYTES) {
        return false;
    }
    for (int i = 0; i < n; i++) {
        if (s[i] <= 0x20 || s[i] >= 0x7f) {
            return false;
        }
    }
    memcpy(out, s, (size_t)n);
    out[n] = '\0';
    return true;
}

/* Identity: SAN URI, else SAN DNS name, else subject CN. */
static bool identity_of(X509 *cert, char *out, size_t cap)
{
    GENERAL_NAMES *names = X509_get_ext_d2i(cert, NID_subject_alt_name, NULL, NULL);
    bool found = false;
    static const int order[] = {GEN_URI, GEN_DNS};
    for (size_t o = 0; o < KMS_ARRAY_LEN(order) && !found && names != NULL; o++) {
        for (int i = 0; i < sk_GENERAL_NAME_num(names) && !found; i++) {
            GENERAL_NAME *g = sk_GENERAL_NAME_value(names, i);
            if (g->type != order[o]) {
                continue;
            }
            ASN1_IA5STRING *s = order[o] == GEN_URI ? g->d.uniformResourceIdentifier : g->d.dNSName;
            found = identity_copy(ASN1_STRING_get0_data(s), ASN1_STRING_length(s), out, cap);
        }
    }
    GENERAL_NAMES_free(names);
    if (found) {
        return true;
    }
    X509_NAME *subj = X509_get_subject_name(cert);
    int idx = X509_NAME_get_index_by_NID(subj, NID_commonName, -1);
    if (idx < 0) {
        return false;
    }
    unsigned char *utf8 = NULL;
    int n = ASN1_STRING_to_UTF8(&utf8, X509_NAME_ENTRY_get_data(X509_NAME_get_entry(subj, idx)));
    found = n > 0 && identity_copy(utf8, n, out, cap);
    OPENSSL_free(utf8);
    return found;
}

static X509 *der_to_x509(const gnutls_datum_t *d)
{
    const unsigned char *p = d->data;
    X509 *x = d2i_X509(NULL, &p, (long)d->size);
    if (x != NULL && p != d->data + d->size) {
        X509_free(x); /* trailing bytes after the certificate */
        return NULL;
    }
    return x;
}

bool kms_api_trust_verify(kms_api_trust *t, gnutls_session_t session, char *identity,
                          size_t identity_cap, const char **reason)
{
    unsigned int n = 0;
    const gnutls_datum_t *peers =
        session != NULL ? gnutls_certificate_get_peers(session, &n) : NULL;
    if (peers == NULL || n == 0) {
        *reason = "no client certificate";
        return false;
    }
    if (n > CERT_CHAIN_MAX) {
        *reason = "client certificate chain too long";
        return false;
    }
    bool ok = false;
    X509 *leaf = der_to_x509(&peers[0]);
    STACK_OF(X509) *chain = sk_X509_new_null();
    X509_STORE_CTX *ctx = X509_STORE_CTX_new();
    *reason = "client certificate unreadable";
    if (leaf == NULL || chain == NULL || ctx == NULL) {
        goto done;
    }
    for (unsigned i = 1; i < n; i++) {
        X509 *x = der_to_x509(&peers[i]);
        if (x == NULL || !sk_X509_push(chain, x)) {
            X509_free(x);
            goto done;
        }
    }
    if (X509_STORE_CTX_init(ctx, t->store, leaf, chain) != 1) {
        goto done;
    }
    /* The certificate must be meant for TLS clients (extendedKeyUsage
     * clientAuth when present, RFC 5280 section 4.2.1.12). */
    X509_STORE_CTX_set_purpose(ctx, X509_PURPOSE_SSL_CLIENT);
    if (t->crl) {
        X509_STORE_CTX_set_flags(ctx, X509_V_FLAG_CRL_CHECK);
    }
    if (X509_verify_cert(ctx) != 1) {
        *reason = verify_reason(X509_STORE_CTX_get_error(ctx));
        goto done;
    }
    if (!identity_of(leaf, identity, identity_cap)) {
        *reason = "certificate names no usable identity (SAN URI, SAN DNS or CN)";
        goto done;
    }
    ok = true;
    *reason = NULL;
done:
    ERR_clear_error();
    X509_STORE_CTX_free(ctx);
    sk_X509_pop_free(chain, X509_free);
    X509_free(leaf);
    return ok;
}

void kms_api_tls_free(void)
{
    pthread_mutex_lock(&cert_lock);
    cert_bundle *b = cert_current;
    cert_current = NULL;
    pthread_mutex_unlock(&cert_lock);
    bundle_free(b);
}

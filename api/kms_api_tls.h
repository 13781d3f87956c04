/* api/ internal: server certificate (GnuTLS) and client verification (OpenSSL). */
#ifndef KMS_API_TLS_H
#define KMS_API_TLS_H

#include "kms_result.h"

#include <gnutls/abstract.h>
#include <gnutls/gnutls.h>
#include <stdbool.h>
#include <stddef.h>

/* Refuses a private key file readable by group or others. */
KMS_RESULT kms_api_key_file_check(const char *path);

/* Loads a certificate chain and its key and makes them current for new
 * handshakes; on any failure the previous pair stays in force. */
KMS_RESULT kms_api_tls_cert_load(const char *cert_path, const char *key_path);
/* For MHD_OPTION_HTTPS_CERT_CALLBACK. */
int kms_api_tls_cert_retrieve(gnutls_session_t session, const gnutls_datum_t *req_ca_rdn, int nreqs,
                              const gnutls_pk_algorithm_t *pk_algos, int pk_algos_length,
                              gnutls_pcert_st **pcert, unsigned int *pcert_length,
                              gnutls_privkey_t *privkey);
void kms_api_tls_free(void);

typedef struct kms_api_trust kms_api_trust;
KMS_RESULT kms_api_trust_load(const char *ca_path, const char *crl_path, kms_api_trust **out);
void kms_api_trust_free(kms_api_trust *t);
/* Verifies the session's client certificate chain against the CA (and
 * CRL); on success writes the identity; on failure sets *reason. */
bool kms_api_trust_verify(kms_api_trust *t, gnutls_session_t session, char *identity,
                          size_t identity_cap, const char **reason);

#endif /* KMS_API_TLS_H */

/*
 * tools/: one question two clients ask of a libcurl failure (kmsctl,
 * kms-reencrypt): did the server cut the connection during the TLS
 * handshake, rather than refuse it?
 *
 * A kmsd that is stopping, restarting, or at its connection limit
 * (connection_limit, per_ip_connection_limit) closes a connection it has
 * just accepted. The client then sees CURLE_SSL_CONNECT_ERROR with a reset,
 * an EOF (SSL_ERROR_SYSCALL, "unexpected eof") or, on its next write, a
 * broken pipe: kmsd is not available right now, and a retry may succeed.
 * A refused certificate or a server that does not speak TLS gives a TLS
 * alert or a protocol error instead, which no retry fixes.
 */
#ifndef KMS_CURL_CUT_H
#define KMS_CURL_CUT_H

#include <stdbool.h>
#include <string.h>

/* detail: libcurl's error buffer (CURLOPT_ERRORBUFFER) of a
 * CURLE_SSL_CONNECT_ERROR. */
static inline bool kms_curl_handshake_cut(const char *detail)
{
    static const char *const cut[] = {"reset by peer", "SYSCALL", "unexpected eof",
                                      "EOF",           "refused", "Broken pipe"};
    for (size_t i = 0; i < sizeof(cut) / sizeof(cut[0]); i++) {
        if (strstr(detail, cut[i]) != NULL) {
            return true;
        }
    }
    return false;
}

#endif /* KMS_CURL_CUT_H */

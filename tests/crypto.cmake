# The fuzz infrastructure first, so that every area can call kms_add_fuzz().
include(${CMAKE_CURRENT_LIST_DIR}/fuzz.cmake)

kms_add_test(error_test SOURCES unit/error_test.c LIBS kms_crypto LABELS unit)
kms_add_test(buf_test SOURCES unit/buf_test.c LIBS kms_crypto LABELS unit)
kms_add_test(base64_test SOURCES unit/base64_test.c LIBS kms_crypto LABELS unit)
kms_add_test(token_test SOURCES unit/token_test.c LIBS kms_crypto LABELS unit)
kms_add_test(secmem_test SOURCES unit/secmem_test.c LIBS kms_crypto LABELS unit)
kms_add_test(hash_test SOURCES unit/hash_test.c LIBS kms_crypto LABELS unit)
kms_add_test(rand_test SOURCES unit/rand_test.c LIBS kms_crypto LABELS unit)

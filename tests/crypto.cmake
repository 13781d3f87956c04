kms_add_test(error_test SOURCES unit/error_test.c LIBS kms_crypto LABELS unit)

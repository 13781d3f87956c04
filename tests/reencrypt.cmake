# kms-reencrypt end to end (label e2e): a throwaway PostgreSQL cluster and a
# real kmsd per test (tests/e2e/lib.sh). Must run as a non-root user
# (PostgreSQL refuses root; scripts/test runs the suite as kmstest); as root
# the tests report "skipped". The ASan+UBSan build runs the same scenarios
# on a fifth of the rows (E2E_ROWS), everything there being slower.
find_program(KMS_PG_CTL pg_ctl PATHS /usr/lib/postgresql/15/bin NO_DEFAULT_PATH)
if(TARGET kms-reencrypt AND TARGET kmsd AND TARGET kms-token AND KMS_PG_CTL)
  if(KMS_SANITIZE)
    set(KMS_E2E_ROWS 20000)
  else()
    set(KMS_E2E_ROWS 100000)
  endif()
  get_filename_component(KMS_PG_BIN ${KMS_PG_CTL} DIRECTORY)
  foreach(scenario full kill restart)
    add_test(NAME reencrypt_${scenario}_test
      COMMAND bash ${KMS_TEST_SOURCE_DIR}/e2e/reencrypt_test.sh ${scenario})
    set_tests_properties(reencrypt_${scenario}_test PROPERTIES LABELS e2e TIMEOUT 400
      SKIP_RETURN_CODE 98 RUN_SERIAL TRUE
      ENVIRONMENT "KMS_SOURCE_DIR=${CMAKE_SOURCE_DIR};KMS_BUILD_DIR=${CMAKE_BINARY_DIR};KMS_SOFTHSM_MODULE=${KMS_SOFTHSM_MODULE};KMSD=$<TARGET_FILE:kmsd>;KMS_TOKEN=$<TARGET_FILE:kms-token>;KMS_REENCRYPT=$<TARGET_FILE:kms-reencrypt>;PG_BIN=${KMS_PG_BIN};E2E_ROWS=${KMS_E2E_ROWS}")
  endforeach()
endif()

# tools/: kmsctl unit tests, the development PKI test, and kmsctl against a
# real kmsd (registered once the kmsd and kms-token targets exist).
kms_add_test(kmsctl_args_test SOURCES unit/kmsctl_args_test.c LIBS kmsctl_core LABELS unit)
kms_add_test(kmsctl_out_test SOURCES unit/kmsctl_out_test.c LIBS kmsctl_core LABELS unit)
kms_add_test(kmsctl_report_test SOURCES unit/kmsctl_report_test.c LIBS kmsctl_core LABELS unit)
# verify-export reads what an auditor was handed: seeds from a real export
# (fuzz/make_export_seeds.sh); each run writes and verifies a directory.
kms_add_fuzz(fuzz_export
  SOURCES fuzz/fuzz_export.c
  LIBS kmsctl_core
  CORPUS fuzz/corpus/fuzz_export
  MUTATIONS 3000)

find_program(KMS_OPENSSL_CLI openssl REQUIRED)
add_test(NAME pki_test COMMAND bash ${KMS_TEST_SOURCE_DIR}/integration/pki_test.sh)
set_tests_properties(pki_test PROPERTIES LABELS integration TIMEOUT 60
  ENVIRONMENT "KMS_SOURCE_DIR=${CMAKE_SOURCE_DIR};KMS_BUILD_DIR=${CMAKE_BINARY_DIR}")

if(TARGET kmsd AND TARGET kms-token AND TARGET kmsctl
   AND EXISTS ${KMS_TEST_SOURCE_DIR}/integration/kmsctl_test.sh)
  add_test(NAME kmsctl_test COMMAND bash ${KMS_TEST_SOURCE_DIR}/integration/kmsctl_test.sh)
  set_tests_properties(kmsctl_test PROPERTIES LABELS integration TIMEOUT 180
    ENVIRONMENT "KMS_SOURCE_DIR=${CMAKE_SOURCE_DIR};KMS_BUILD_DIR=${CMAKE_BINARY_DIR};KMS_SOFTHSM_MODULE=${KMS_SOFTHSM_MODULE};KMSCTL=$<TARGET_FILE:kmsctl>;KMSD=$<TARGET_FILE:kmsd>;KMS_TOKEN=$<TARGET_FILE:kms-token>")
  # scripts/dev-up --no-start with this build's binaries, in a temp data dir.
  add_test(NAME kmsctl_devup_test
    COMMAND bash ${KMS_TEST_SOURCE_DIR}/integration/kmsctl_devup_test.sh)
  set_tests_properties(kmsctl_devup_test PROPERTIES LABELS integration TIMEOUT 180
    ENVIRONMENT "KMS_SOURCE_DIR=${CMAKE_SOURCE_DIR};KMS_BUILD_DIR=${CMAKE_BINARY_DIR}")
endif()

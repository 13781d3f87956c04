# kms/ tests: record codec (unit), and the domain on real SoftHSM tokens
# (integration; each test makes its own throwaway token and store).
kms_add_test(kms_record_test SOURCES unit/kms_record_test.c LIBS kms_core LABELS unit)
kms_add_test(kms_core_test SOURCES integration/kms_core_test.c LIBS kms_core kms_testlib
  LABELS integration TIMEOUT 120)
kms_add_test(kms_token_mutation_test SOURCES integration/kms_token_mutation_test.c
  LIBS kms_core kms_testlib LABELS integration TIMEOUT 120)
kms_add_test(kms_states_test SOURCES integration/kms_states_test.c
  LIBS kms_core kms_testlib LABELS integration TIMEOUT 120)
kms_add_test(kms_master_test SOURCES integration/kms_master_test.c
  LIBS kms_core kms_testlib LABELS integration TIMEOUT 180)

# kms/ tests: record codec (unit), and the domain on real SoftHSM tokens
# (integration; each test makes its own throwaway token and store).
kms_add_test(kms_record_test SOURCES unit/kms_record_test.c LIBS kms_core LABELS unit)
# The store's reserve for pruning (a throwaway LMDB environment, no token).
kms_add_test(kms_store_test SOURCES unit/kms_store_test.c LIBS kms_core LABELS unit)
kms_add_test(kms_core_test SOURCES integration/kms_core_test.c LIBS kms_core kms_testlib
  LABELS integration TIMEOUT 120)
kms_add_test(kms_token_mutation_test SOURCES integration/kms_token_mutation_test.c
  LIBS kms_core kms_testlib LABELS integration TIMEOUT 120)
kms_add_test(kms_states_test SOURCES integration/kms_states_test.c
  LIBS kms_core kms_testlib LABELS integration TIMEOUT 120)
kms_add_test(kms_master_test SOURCES integration/kms_master_test.c
  LIBS kms_core kms_testlib LABELS integration TIMEOUT 180)
kms_add_test(kms_schedule_test SOURCES integration/kms_schedule_test.c
  LIBS kms_core kms_testlib LABELS integration TIMEOUT 180)
# Audit trail (helper G1): chain, group commit, signatures, pruning, full store.
kms_add_test(kms_audit_test SOURCES integration/kms_audit_test.c LIBS kms_core kms_testlib
  LABELS integration TIMEOUT 180)
# Compliance export and its offline verification, tamper matrix; the audit
# trail through a real kmsd: kill -9 after a burst, a full audit device
# (helper G1).
if(TARGET kms_api AND TARGET kmsctl_core)
  kms_add_test(audit_export_test SOURCES integration/audit_export_test.c
    LIBS kms_api kmsctl_core kms_testlib LABELS integration TIMEOUT 180)
endif()
if(TARGET kmsd AND TARGET kms_testlib AND TARGET kmsctl_core)
  kms_add_test(api_audit_test
    SOURCES integration/api_audit_test.c integration/api_fixture.c
    LIBS kms_testlib kmsctl_core PkgConfig::CURL PkgConfig::JANSSON Threads::Threads
    LABELS integration
    TIMEOUT 300)
  add_dependencies(api_audit_test kmsd kmsctl)
endif()

if(COMMAND kms_add_fuzz)
  kms_add_fuzz(fuzz_journal
    SOURCES fuzz/fuzz_journal.c
    LIBS kms_core
    CORPUS fuzz/corpus/fuzz_journal
    MUTATIONS 3000)
  kms_add_fuzz(fuzz_record
    SOURCES fuzz/fuzz_record.c
    LIBS kms_core
    CORPUS fuzz/corpus/fuzz_record)
endif()

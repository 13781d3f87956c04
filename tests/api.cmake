# api/ and kmsd: parser unit tests, fuzz replays, and integration tests that
# run a real kmsd against a throwaway SoftHSM token, LMDB and PKI.
kms_add_test(api_config_test SOURCES unit/api_config_test.c LIBS kms_api_conf LABELS unit)
kms_add_test(api_policy_test SOURCES unit/api_policy_test.c LIBS kms_api_conf LABELS unit)

if(COMMAND kms_add_fuzz)
  kms_add_fuzz(fuzz_config
    SOURCES fuzz/fuzz_config.c
    LIBS kms_api_conf
    CORPUS fuzz/corpus/fuzz_config
    MUTATIONS 5000)
  kms_add_fuzz(fuzz_policy
    SOURCES fuzz/fuzz_policy.c
    LIBS kms_api_conf
    CORPUS fuzz/corpus/fuzz_policy
    MUTATIONS 3000)
  if(TARGET kms_api)
    kms_add_fuzz(fuzz_json_request
      SOURCES fuzz/fuzz_json_request.c
      LIBS kms_api
      CORPUS fuzz/corpus/fuzz_json_request
      MUTATIONS 2000)
  endif()
endif()

# Integration: a real kmsd (needs the daemon and the token helpers).
if(TARGET kmsd AND TARGET kms_testlib)
  kms_add_test(api_server_test
    SOURCES integration/api_server_test.c integration/api_fixture.c
    LIBS kms_testlib PkgConfig::CURL PkgConfig::JANSSON Threads::Threads
    LABELS integration
    TIMEOUT 240)
  add_dependencies(api_server_test kmsd)
  # Rotation operations end to end: status, scheduler, emergency usage
  # report, monthly report, kmsctl status/report.
  kms_add_test(api_rotation_test
    SOURCES integration/api_rotation_test.c integration/api_fixture.c
    LIBS kms_testlib PkgConfig::CURL PkgConfig::JANSSON Threads::Threads
    LABELS integration
    TIMEOUT 120)
  add_dependencies(api_rotation_test kmsd kmsctl)
endif()

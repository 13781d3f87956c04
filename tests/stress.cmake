# Stress tests: HSM torture at the domain level, kill -9, scale (tests/stress/).
# Registered only once the layers they drive exist, so that configuring the
# tree never depends on another area being finished.
if(TARGET kms_core AND TARGET kms_testlib)
  add_library(kms_stress_util STATIC ${KMS_TEST_SOURCE_DIR}/stress/stress_util.c)
  target_link_libraries(kms_stress_util PUBLIC kms_core)
  target_include_directories(kms_stress_util PUBLIC ${KMS_TEST_SOURCE_DIR}/stress)

  if(TARGET kmsfault)
    kms_add_test(kms_torture_test
      SOURCES ${KMS_TEST_SOURCE_DIR}/stress/torture_test.c
      LIBS kms_stress_util kms_testlib kms_core PkgConfig::P11KIT
      LABELS hsm-fault
      TIMEOUT 240)
    add_dependencies(kms_torture_test kmsfault)
  endif()

  # The victim of the crash test: rotates and wraps until SIGKILLed.
  add_executable(kms_rotate_loop ${KMS_TEST_SOURCE_DIR}/stress/rotate_loop.c)
  target_link_libraries(kms_rotate_loop PRIVATE kms_stress_util kms_core)

  kms_add_test(kms_crash_test
    SOURCES ${KMS_TEST_SOURCE_DIR}/stress/crash_test.c
    LIBS kms_stress_util kms_testlib kms_core
    LABELS integration
    TIMEOUT 300)
  target_compile_definitions(kms_crash_test PRIVATE
    KMS_ROTATE_LOOP_PATH="$<TARGET_FILE:kms_rotate_loop>")
  add_dependencies(kms_crash_test kms_rotate_loop)
  # The same executable, second group: several processes on one store and
  # token at once (kmsd's workers = processes:N), see test_two_writers.
  add_test(NAME kms_multiproc_test COMMAND kms_crash_test two-writers)
  set_tests_properties(kms_multiproc_test PROPERTIES LABELS integration TIMEOUT 120
    ENVIRONMENT "KMS_SOFTHSM_MODULE=${KMS_SOFTHSM_MODULE};KMS_BUILD_DIR=${CMAKE_BINARY_DIR};KMS_SOURCE_DIR=${CMAKE_SOURCE_DIR}")

  kms_add_test(kms_scale_test
    SOURCES ${KMS_TEST_SOURCE_DIR}/stress/scale_test.c
    LIBS kms_stress_util kms_testlib kms_core Threads::Threads
    LABELS integration
    TIMEOUT 600)
endif()

# kms-bench's core mode end to end on a throwaway token (short cells): the
# tool runs standalone, its worker processes start, and it prints every cell.
if(TARGET kms-bench)
  add_test(NAME kms_bench_smoke
    COMMAND kms-bench core --throwaway --seconds 0.3 --json)
  set_tests_properties(kms_bench_smoke PROPERTIES LABELS integration TIMEOUT 120
    ENVIRONMENT "KMS_SOFTHSM_MODULE=${KMS_SOFTHSM_MODULE}"
    PASS_REGULAR_EXPRESSION "\"ratio_unwrap\":\\[[0-9.]+,[0-9.]+,[0-9.]+\\]")
  # Its audit mode likewise: off and on alternate, the audit starts and
  # stops between slices, and both cells have a figure.
  add_test(NAME kms_bench_audit_smoke
    COMMAND kms-bench audit --throwaway --seconds 1 --connections 1,4 --json)
  set_tests_properties(kms_bench_audit_smoke PROPERTIES LABELS integration TIMEOUT 120
    ENVIRONMENT "KMS_SOFTHSM_MODULE=${KMS_SOFTHSM_MODULE}"
    PASS_REGULAR_EXPRESSION "\"threads\":4,\"audit_off\":[1-9][0-9.]*,\"audit_on\":[1-9][0-9.]*,")
endif()
# Its http mode against a throwaway kmsd (bench-http.sh): every cell answers,
# connections spread over client threads, the open loop keeps its rate.
if(TARGET kms-bench AND TARGET kmsd AND TARGET kms-token)
  add_test(NAME kms_bench_http_smoke
    COMMAND ${CMAKE_SOURCE_DIR}/tests/stress/bench-http-smoke.sh ${CMAKE_BINARY_DIR})
  set_tests_properties(kms_bench_http_smoke PROPERTIES LABELS integration TIMEOUT 180
    ENVIRONMENT "KMS_SOFTHSM_MODULE=${KMS_SOFTHSM_MODULE}"
    PASS_REGULAR_EXPRESSION "bench-http-smoke: ok")
endif()
if(TARGET kms_scale_test)
  # cmocka exits 0 for a skipped test: let ctest say "skipped" (the
  # sanitizer build skips the scale test, see scale_test.c).
  set_tests_properties(kms_scale_test PROPERTIES SKIP_REGULAR_EXPRESSION "\\[  SKIPPED \\]")
endif()

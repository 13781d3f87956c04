# hsm/ tests, the fault-injecting PKCS#11 module and the HSM test helpers.

# libkmsfault.so: forwards to SoftHSM (env KMS_FAULT_MODULE) and fails or
# delays chosen calls as its control file says. Tests only, never installed.
add_library(kmsfault MODULE ${CMAKE_CURRENT_SOURCE_DIR}/lib/p11fault/p11fault.c)
target_include_directories(kmsfault PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/lib/p11fault)
target_link_libraries(kmsfault PRIVATE PkgConfig::P11KIT Threads::Threads ${CMAKE_DL_LIBS})
set_target_properties(kmsfault PROPERTIES PREFIX "lib" OUTPUT_NAME kmsfault)

# kms_testlib: throwaway SoftHSM tokens (kms_test_hsm.h) and the fault
# control API (kms_fault.h). The fault module's path is compiled in as
# KMS_FAULT_MODULE_PATH; env KMS_FAULT_MODULE_PATH overrides it.
add_library(kms_testlib STATIC
  ${CMAKE_CURRENT_SOURCE_DIR}/lib/kms_test_hsm.c
  ${CMAKE_CURRENT_SOURCE_DIR}/lib/kms_fault.c)
target_include_directories(kms_testlib PUBLIC ${CMAKE_CURRENT_SOURCE_DIR}/lib)
target_link_libraries(kms_testlib PUBLIC kms_hsm)
target_compile_definitions(kms_testlib PRIVATE KMS_FAULT_MODULE_PATH="$<TARGET_FILE:kmsfault>")
add_dependencies(kms_testlib kmsfault)

# Unit tests of hsm/ internals (no token): the LRU cache and the CK_RV map.
kms_add_test(hsm_lru_test SOURCES unit/hsm_lru_test.c LIBS kms_hsm Threads::Threads LABELS unit)
kms_add_test(hsm_p11_test SOURCES unit/hsm_p11_test.c LIBS kms_hsm LABELS unit)

kms_add_test(hsm_test SOURCES integration/hsm_test.c LIBS kms_testlib Threads::Threads
  LABELS integration TIMEOUT 180)

kms_add_test(hsm_fault_test SOURCES integration/hsm_fault_test.c LIBS kms_testlib Threads::Threads
  LABELS hsm-fault TIMEOUT 300)

# kms-token end to end (init with generated PINs, list, check, exit codes).
if(TARGET kms-token)
  add_test(NAME hsm_token_tool_test
    COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/integration/hsm_token_tool_test.sh
            $<TARGET_FILE:kms-token>)
  set_tests_properties(hsm_token_tool_test PROPERTIES LABELS integration TIMEOUT 60
    ENVIRONMENT "KMS_SOFTHSM_MODULE=${KMS_SOFTHSM_MODULE}")
endif()

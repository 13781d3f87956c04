# kms-bench: the load generator and baseline meter (docs/performance.md).
if(TARGET kms_core)
  add_executable(kms-bench
    ${CMAKE_CURRENT_SOURCE_DIR}/kms-bench.c
    ${CMAKE_CURRENT_SOURCE_DIR}/kms_bench_http.c
    ${CMAKE_CURRENT_SOURCE_DIR}/kms_bench_audit.c)
  target_link_libraries(kms-bench PRIVATE kms_core PkgConfig::CURL PkgConfig::JANSSON
    Threads::Threads)
endif()

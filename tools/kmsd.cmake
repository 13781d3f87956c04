# kmsd: the daemon. Built once kms_core (and so kms_api) exists.
if(TARGET kms_api)
  add_executable(kmsd ${CMAKE_CURRENT_SOURCE_DIR}/kmsd.c)
  target_link_libraries(kmsd PRIVATE kms_api Threads::Threads)
  target_compile_definitions(kmsd PRIVATE KMSD_VERSION="${PROJECT_VERSION}")
endif()

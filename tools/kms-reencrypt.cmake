# kms-reencrypt: online, resumable re-encryption of PostgreSQL columns through
# kmsd's batch rewrap endpoint (docs/reencrypt.md). Needs libpq.
if(LIBPQ_FOUND)
  add_executable(kms-reencrypt
    ${CMAKE_CURRENT_SOURCE_DIR}/kms-reencrypt.c
    ${CMAKE_CURRENT_SOURCE_DIR}/kms_reencrypt_db.c
    ${CMAKE_CURRENT_SOURCE_DIR}/kms_reencrypt_http.c)
  target_link_libraries(kms-reencrypt PRIVATE kms_crypto PkgConfig::LIBPQ PkgConfig::CURL
    PkgConfig::JANSSON Threads::Threads)
  install(TARGETS kms-reencrypt RUNTIME DESTINATION bin)
endif()

# The HSM floor of scripts/bench-reencrypt (raw PKCS#11 decrypt + encrypt
# loop); a benchmark helper, not installed.
if(TARGET kms_hsm)
  add_executable(kms-reencrypt-floor ${CMAKE_CURRENT_SOURCE_DIR}/kms_reencrypt_floor.c)
  target_link_libraries(kms-reencrypt-floor PRIVATE kms_hsm)
endif()

# kms-token: token set-up and inspection (init, list, check).
add_executable(kms-token ${CMAKE_CURRENT_SOURCE_DIR}/kms-token.c)
target_link_libraries(kms-token PRIVATE kms_hsm)
install(TARGETS kms-token RUNTIME DESTINATION bin)

# kmsctl: the command-line client over kmsd's HTTPS API (libcurl, jansson).
# The argument tables and output formatting are a library of their own so
# that the unit tests (tests/tools.cmake) link them without libcurl.
add_library(kmsctl_core STATIC kmsctl_args.c kmsctl_out.c kmsctl_report.c kmsctl_verify.c)
target_include_directories(kmsctl_core PUBLIC ${CMAKE_CURRENT_SOURCE_DIR})
target_link_libraries(kmsctl_core PUBLIC kms_crypto PkgConfig::JANSSON m)

add_executable(kmsctl kmsctl.c)
target_link_libraries(kmsctl PRIVATE kmsctl_core kms_crypto PkgConfig::CURL PkgConfig::JANSSON)

# Fuzz targets and their replay tests.
#
# A fuzz target is a file defining
#     int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
# (and optionally LLVMFuzzerInitialize; fuzz/fuzz_check.h declares it and
# CHECK). It must return 0 and abort() when an
# invariant breaks; it must not leak, exit, or keep state between calls.
#
# Register one from your area's tests/<area>.cmake (this file is included by
# tests/crypto.cmake first, so the function exists for every area):
#
#   kms_add_fuzz(fuzz_policy
#     SOURCES fuzz/fuzz_policy.c         # relative to tests/
#     LIBS kms_api                       # what the target links
#     CORPUS fuzz/corpus/fuzz_policy     # seed directory, relative to tests/
#     [MUTATIONS 5000]                   # mutations per corpus file (default 20000)
#     [TIMEOUT 300])                     # ctest timeout in seconds (default 300)
#
# This builds <name> = the target + tests/fuzz/replay_main.c and registers
# the ctest <name> (label "fuzz"), which runs every corpus file and then
# MUTATIONS deterministic mutations of each; keep a target's replay under
# ~20 s in the sanitizer build (set MUTATIONS lower for slow targets).
# Put every finding into the corpus directory: it is a regression test from
# then on.
#
# With clang and -DKMS_LIBFUZZER=ON it also builds <name>_libfuzzer, a real
# libFuzzer binary. For coverage-guided fuzzing of the libraries (not only of
# the target file), configure a dedicated build directory like this:
#
#   CC=clang cmake -S . -B build-fuzz -DKMS_LIBFUZZER=ON -DKMS_SANITIZE=ON \
#       -DCMAKE_C_FLAGS=-fsanitize=fuzzer-no-link
#   cmake --build build-fuzz --target fuzz_token_libfuzzer
#   build-fuzz/tests/fuzz_token_libfuzzer -max_total_time=60 \
#       -max_len=4096 /tmp/corpus-work tests/fuzz/corpus/fuzz_token
#
# (-fsanitize=fuzzer-no-link instruments every library for coverage; the
# ASan runtime of KMS_SANITIZE=ON supplies the coverage callbacks for the
# non-fuzzer executables of that build.)
include_guard(GLOBAL)

option(KMS_LIBFUZZER "Also build <target>_libfuzzer binaries (clang only)" OFF)
if(KMS_LIBFUZZER AND NOT CMAKE_C_COMPILER_ID MATCHES "Clang")
  message(WARNING "KMS_LIBFUZZER=ON needs clang; only the replay tests are built")
endif()

set(KMS_FUZZ_DIR ${CMAKE_CURRENT_LIST_DIR}/fuzz)

function(kms_add_fuzz name)
  cmake_parse_arguments(A "" "CORPUS;MUTATIONS;TIMEOUT" "SOURCES;LIBS" ${ARGN})
  if(NOT A_SOURCES OR NOT A_CORPUS)
    message(FATAL_ERROR "kms_add_fuzz(${name}): SOURCES and CORPUS are required")
  endif()
  if(NOT A_MUTATIONS)
    set(A_MUTATIONS 20000)
  endif()
  if(NOT A_TIMEOUT)
    set(A_TIMEOUT 300)
  endif()
  get_filename_component(corpus ${A_CORPUS} ABSOLUTE BASE_DIR ${KMS_TEST_SOURCE_DIR})

  add_executable(${name} ${KMS_FUZZ_DIR}/replay_main.c ${A_SOURCES})
  target_link_libraries(${name} PRIVATE ${A_LIBS})
  target_compile_definitions(${name} PRIVATE KMS_FUZZ_DEFAULT_MUTATIONS=${A_MUTATIONS})
  add_test(NAME ${name} COMMAND ${name} ${corpus})
  set_tests_properties(${name} PROPERTIES LABELS fuzz TIMEOUT ${A_TIMEOUT}
    ENVIRONMENT "KMS_SOFTHSM_MODULE=${KMS_SOFTHSM_MODULE};KMS_BUILD_DIR=${CMAKE_BINARY_DIR};KMS_SOURCE_DIR=${CMAKE_SOURCE_DIR}")

  if(KMS_LIBFUZZER AND CMAKE_C_COMPILER_ID MATCHES "Clang")
    add_executable(${name}_libfuzzer ${A_SOURCES})
    target_link_libraries(${name}_libfuzzer PRIVATE ${A_LIBS})
    target_compile_options(${name}_libfuzzer PRIVATE -fsanitize=fuzzer)
    target_link_options(${name}_libfuzzer PRIVATE -fsanitize=fuzzer)
  endif()
endfunction()

kms_add_fuzz(fuzz_token
  SOURCES fuzz/fuzz_token.c
  LIBS kms_crypto
  CORPUS fuzz/corpus/fuzz_token)
kms_add_fuzz(fuzz_base64
  SOURCES fuzz/fuzz_base64.c
  LIBS kms_crypto
  CORPUS fuzz/corpus/fuzz_base64)

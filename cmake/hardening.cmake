# Compiler warnings and hardening applied to every target of the project.
add_compile_options(
  -Wall -Wextra -Wshadow -Wformat=2 -Wformat-security -Wstrict-prototypes
  -Wmissing-prototypes -Wvla -Wno-unused-parameter
  -fstack-protector-strong -fno-common -fstack-clash-protection)
if(KMS_WERROR)
  add_compile_options(-Werror)
endif()
if(NOT CMAKE_BUILD_TYPE STREQUAL "Debug" AND NOT KMS_SANITIZE)
  add_compile_definitions(_FORTIFY_SOURCE=2)
endif()
add_link_options(-Wl,-z,relro -Wl,-z,now -Wl,-z,noexecstack)
set(CMAKE_POSITION_INDEPENDENT_CODE ON)

if(KMS_SANITIZE)
  add_compile_options(-fsanitize=address,undefined -fno-sanitize-recover=all
                      -fno-omit-frame-pointer -O1)
  add_link_options(-fsanitize=address,undefined -fno-sanitize-recover=all)
  add_compile_definitions(KMS_SANITIZE=1)
endif()

# kms_add_library(name SOURCES ... DEPS ...): a layer library whose public
# include directory is its own folder.
function(kms_add_library name)
  cmake_parse_arguments(A "" "" "SOURCES;DEPS" ${ARGN})
  add_library(${name} STATIC ${A_SOURCES})
  target_include_directories(${name} PUBLIC ${CMAKE_CURRENT_SOURCE_DIR})
  target_link_libraries(${name} PUBLIC ${A_DEPS})
endfunction()

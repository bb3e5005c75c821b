# The pinned flash-attention, as vLLM's cmake/external_projects/vllm_flash_attn.cmake
# declares it, limited to what overlay mode needs: the FA4 (CuTe DSL, pure Python)
# component. The pin itself lives in pins.json (one data file for all pins).
include(FetchContent)

file(READ "${CMAKE_CURRENT_LIST_DIR}/../../pins.json" _VLLM_FORGE_PINS)
string(JSON VLLM_FLASH_ATTN_GIT_TAG GET "${_VLLM_FORGE_PINS}" flash_attention commit)
string(JSON VLLM_FLASH_ATTN_GIT_REPOSITORY GET "${_VLLM_FORGE_PINS}" flash_attention git_repository)

# Like vLLM: VLLM_FLASH_ATTN_SRC_DIR (environment first, then cache variable)
# replaces the download by a local checkout.
if(DEFINED ENV{VLLM_FLASH_ATTN_SRC_DIR})
  set(VLLM_FLASH_ATTN_SRC_DIR $ENV{VLLM_FLASH_ATTN_SRC_DIR})
endif()

# SOURCE_SUBDIR points at a directory without a CMakeLists.txt, so
# FetchContent_MakeAvailable only populates the sources: the CUDA parts of
# flash-attention (FA2/FA3) are not configured in overlay mode.
if(VLLM_FLASH_ATTN_SRC_DIR)
  FetchContent_Declare(
    vllm-flash-attn
    SOURCE_DIR ${VLLM_FLASH_ATTN_SRC_DIR}
    SOURCE_SUBDIR flash_attn/cute
  )
else()
  FetchContent_Declare(
    vllm-flash-attn
    GIT_REPOSITORY ${VLLM_FLASH_ATTN_GIT_REPOSITORY}
    GIT_TAG ${VLLM_FLASH_ATTN_GIT_TAG}
    GIT_PROGRESS TRUE
    SOURCE_SUBDIR flash_attn/cute
  )
endif()
FetchContent_MakeAvailable(vllm-flash-attn)
message(STATUS "vllm-flash-attn (${VLLM_FLASH_ATTN_GIT_TAG}) is available at ${vllm-flash-attn_SOURCE_DIR}")

if(NOT EXISTS "${vllm-flash-attn_SOURCE_DIR}/flash_attn/cute/interface.py")
  message(FATAL_ERROR "${vllm-flash-attn_SOURCE_DIR} has no flash_attn/cute/interface.py: not a flash-attention checkout")
endif()

#
# FA4 CuteDSL component: copy flash_attn/cute/*.py and rewrite the imports
# flash_attn.cute -> vllm.vllm_flash_attn.cute (same code as vLLM's copy branch;
# a wheel cannot hold vLLM's symlink variant, so the copy is used for local
# source directories too).
#
add_custom_target(_vllm_fa4_cutedsl_C)
install(CODE "
  file(GLOB_RECURSE CUTE_PY_FILES \"${vllm-flash-attn_SOURCE_DIR}/flash_attn/cute/*.py\")
  foreach(SRC_FILE \${CUTE_PY_FILES})
    file(RELATIVE_PATH REL_PATH \"${vllm-flash-attn_SOURCE_DIR}/flash_attn/cute\" \${SRC_FILE})
    set(DST_FILE \"\${CMAKE_INSTALL_PREFIX}/vllm/vllm_flash_attn/cute/\${REL_PATH}\")
    get_filename_component(DST_DIR \${DST_FILE} DIRECTORY)
    file(MAKE_DIRECTORY \${DST_DIR})
    file(READ \${SRC_FILE} FILE_CONTENTS)
    string(REPLACE \"flash_attn.cute\" \"vllm.vllm_flash_attn.cute\" FILE_CONTENTS \"\${FILE_CONTENTS}\")
    file(WRITE \${DST_FILE} \"\${FILE_CONTENTS}\")
  endforeach()
" COMPONENT _vllm_fa4_cutedsl_C)

# The pinned flash-attention, as vLLM's cmake/external_projects/vllm_flash_attn.cmake
# declares it, limited to what overlay mode needs: the FA4 (CuTe DSL, pure Python)
# component. The pin itself lives in pins.json (one data file for all pins).
include(FetchContent)

file(READ "${CMAKE_CURRENT_LIST_DIR}/../../pins.json" _VLLM_FORGE_PINS)
# the backport pin by default; a `tune` build passes its release's own pin (VLLM_FORGE_FA_COMMIT)
if(VLLM_FORGE_FA_COMMIT)
  set(VLLM_FLASH_ATTN_GIT_TAG ${VLLM_FORGE_FA_COMMIT})
else()
  string(JSON VLLM_FLASH_ATTN_GIT_TAG GET "${_VLLM_FORGE_PINS}" flash_attention commit)
endif()
string(JSON VLLM_FLASH_ATTN_GIT_REPOSITORY GET "${_VLLM_FORGE_PINS}" flash_attention git_repository)

# Like vLLM: VLLM_FLASH_ATTN_SRC_DIR (environment first, then cache variable)
# replaces the download by a local checkout.
if(DEFINED ENV{VLLM_FLASH_ATTN_SRC_DIR})
  set(VLLM_FLASH_ATTN_SRC_DIR $ENV{VLLM_FLASH_ATTN_SRC_DIR})
endif()

# Overlay mode: SOURCE_SUBDIR points at a directory without a CMakeLists.txt, so
# FetchContent_MakeAvailable only populates the sources: the CUDA parts of
# flash-attention (FA2/FA3) are not configured. VLLM_FORGE_FA_CUDA: flash-attention's
# own CMakeLists.txt is configured (as vLLM does), for TORCH_CUDA_ARCH_LIST (default
# 9.0a), through the compiler launcher (sccache/ccache).
if(VLLM_FORGE_FA_CUDA)
  include(${CMAKE_CURRENT_LIST_DIR}/../compiler_launcher.cmake)
  include(${CMAKE_CURRENT_LIST_DIR}/../cuda_arches.cmake)
  set(_VF_SUBDIR "")
  set(VLLM_FORGE_FA4_PACKAGE "vllm_flash_attn" CACHE STRING "Python package that holds FA4 (cute/)")
  # the submodules flash-attention needs for CUDA (not composable_kernel / aiter)
  set(_VF_GIT_SUBMODULES GIT_SUBMODULES csrc/cutlass)
else()
  set(_VF_SUBDIR flash_attn/cute)
  set(VLLM_FORGE_FA4_PACKAGE "vllm.vllm_flash_attn" CACHE STRING "Python package that holds FA4 (cute/)")
  set(_VF_GIT_SUBMODULES GIT_SUBMODULES "")
endif()
if(VLLM_FLASH_ATTN_SRC_DIR)
  FetchContent_Declare(
    vllm-flash-attn
    SOURCE_DIR ${VLLM_FLASH_ATTN_SRC_DIR}
    SOURCE_SUBDIR "${_VF_SUBDIR}"
  )
else()
  FetchContent_Declare(
    vllm-flash-attn
    GIT_REPOSITORY ${VLLM_FLASH_ATTN_GIT_REPOSITORY}
    GIT_TAG ${VLLM_FLASH_ATTN_GIT_TAG}
    GIT_PROGRESS TRUE
    ${_VF_GIT_SUBMODULES}
    SOURCE_SUBDIR "${_VF_SUBDIR}"
  )
endif()
if(VLLM_FORGE_FA_CUDA AND VLLM_FLASH_ATTN_SRC_DIR)
  foreach(_vf_need CMakeLists.txt csrc/flash_attn/flash_api.cpp hopper/flash_api.cpp csrc/cutlass/include/cute/tensor.hpp)
    if(NOT EXISTS "${VLLM_FLASH_ATTN_SRC_DIR}/${_vf_need}")
      message(FATAL_ERROR "${VLLM_FLASH_ATTN_SRC_DIR} lacks ${_vf_need}: VLLM_FORGE_FA_CUDA needs a full "
        "flash-attention checkout at ${VLLM_FLASH_ATTN_GIT_TAG} with its csrc/cutlass submodule "
        "(git submodule update --init csrc/cutlass)")
    endif()
  endforeach()
endif()
FetchContent_MakeAvailable(vllm-flash-attn)
message(STATUS "vllm-flash-attn (${VLLM_FLASH_ATTN_GIT_TAG}) is available at ${vllm-flash-attn_SOURCE_DIR}")

if(NOT EXISTS "${vllm-flash-attn_SOURCE_DIR}/flash_attn/cute/interface.py")
  message(FATAL_ERROR "${vllm-flash-attn_SOURCE_DIR} has no flash_attn/cute/interface.py: not a flash-attention checkout")
endif()

if(VLLM_FORGE_FA_CUDA)
  # the FA3 kernel set, trimmed with flash-attention's own switches (VLLM_FORGE_FA3_DISABLE), and
  # the reproducibility flags (VLLM_FORGE_REPRODUCIBLE), both on the fetched project's targets
  include(${CMAKE_CURRENT_LIST_DIR}/../fa3_trim.cmake)
  include(${CMAKE_CURRENT_LIST_DIR}/../reproducible.cmake)
  if(TARGET _vllm_fa3_C)
    vllm_forge_fa3_trim(_vllm_fa3_C)
  endif()
  foreach(_vf_target _vllm_fa2_C _vllm_fa3_C)
    if(TARGET ${_vf_target})
      vllm_forge_reproducible(${_vf_target} "${vllm-flash-attn_SOURCE_DIR}")
    endif()
  endforeach()
  # flash-attention installs _vllm_fa2_C/_vllm_fa3_C into vllm_flash_attn/ (relative to the
  # prefix); its Python interface goes with each component, as in vLLM's external project.
  foreach(_vf_component _vllm_fa2_C _vllm_fa3_C)
    install(DIRECTORY ${vllm-flash-attn_SOURCE_DIR}/vllm_flash_attn/ DESTINATION vllm_flash_attn
            COMPONENT ${_vf_component} FILES_MATCHING PATTERN "*.py")
  endforeach()
endif()

#
# FA4 CuteDSL component: copy flash_attn/cute/*.py and rewrite the imports
# flash_attn.cute -> ${VLLM_FORGE_FA4_PACKAGE}.cute (vllm.vllm_flash_attn.cute: same code as
# vLLM's copy branch; a wheel cannot hold vLLM's symlink variant, so the copy is used for local
# source directories too).
#
string(REPLACE "." "/" _VF_FA4_DIR "${VLLM_FORGE_FA4_PACKAGE}")
add_custom_target(_vllm_fa4_cutedsl_C)
install(CODE "
  file(GLOB_RECURSE CUTE_PY_FILES \"${vllm-flash-attn_SOURCE_DIR}/flash_attn/cute/*.py\")
  foreach(SRC_FILE \${CUTE_PY_FILES})
    file(RELATIVE_PATH REL_PATH \"${vllm-flash-attn_SOURCE_DIR}/flash_attn/cute\" \${SRC_FILE})
    set(DST_FILE \"\${CMAKE_INSTALL_PREFIX}/${_VF_FA4_DIR}/cute/\${REL_PATH}\")
    get_filename_component(DST_DIR \${DST_FILE} DIRECTORY)
    file(MAKE_DIRECTORY \${DST_DIR})
    file(READ \${SRC_FILE} FILE_CONTENTS)
    string(REPLACE \"flash_attn.cute\" \"${VLLM_FORGE_FA4_PACKAGE}.cute\" FILE_CONTENTS \"\${FILE_CONTENTS}\")
    file(WRITE \${DST_FILE} \"\${FILE_CONTENTS}\")
  endforeach()
" COMPONENT _vllm_fa4_cutedsl_C)

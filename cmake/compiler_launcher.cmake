# Compiler launcher for the compiled parts of a build: sccache, else ccache, when present
# (VLLM_FORGE_COMPILER_LAUNCHER overrides; set it to "" to disable). sccache is what makes a
# compile cache shareable across machines: point it at Redis (SCCACHE_REDIS_ENDPOINT), S3
# (SCCACHE_BUCKET, SCCACHE_REGION) or GCS (SCCACHE_GCS_BUCKET).
if(NOT DEFINED VLLM_FORGE_COMPILER_LAUNCHER)
  find_program(_VLLM_FORGE_SCCACHE sccache)
  find_program(_VLLM_FORGE_CCACHE ccache)
  if(_VLLM_FORGE_SCCACHE)
    set(VLLM_FORGE_COMPILER_LAUNCHER ${_VLLM_FORGE_SCCACHE})
  elseif(_VLLM_FORGE_CCACHE)
    set(VLLM_FORGE_COMPILER_LAUNCHER ${_VLLM_FORGE_CCACHE})
  else()
    set(VLLM_FORGE_COMPILER_LAUNCHER "")
  endif()
endif()
if(VLLM_FORGE_COMPILER_LAUNCHER)
  message(STATUS "compiler launcher: ${VLLM_FORGE_COMPILER_LAUNCHER}")
  foreach(_lang C CXX CUDA)
    set(CMAKE_${_lang}_COMPILER_LAUNCHER ${VLLM_FORGE_COMPILER_LAUNCHER})
  endforeach()
endif()

# Trimming the FA3 kernel set (_vllm_fa3_C) with flash-attention's own switches.
#
# flash-attention's hopper code has FLASHATTENTION_DISABLE_<X> switches (the same ones its
# hopper/setup.py sets from FLASH_ATTENTION_DISABLE_<X>): each one turns the dispatch of a feature,
# dtype or head dim off in flash_api.cpp, so its kernel instantiations are never referenced. Its
# CMakeLists.txt (the vLLM fork) exposes none of them and globs every instantiation, so this file
# does it declaratively, without touching the fetched tree:
#
#   -DVLLM_FORGE_FA3_DISABLE="FP16;FP8;HDIM96;HDIM192;HDIMDIFF64;HDIMDIFF192;SOFTCAP;SPLIT"
#
# adds -DFLASHATTENTION_DISABLE_<X> to _vllm_fa3_C and drops the instantiation units (under
# hopper/instantiations/) that the switch makes unreachable. Empty (the default): vLLM's kernel set.
set(VLLM_FORGE_FA3_DISABLE "" CACHE STRING
  "FA3 switches to turn off (FLASHATTENTION_DISABLE_<X>): FP16 FP8 HDIM64 HDIM96 HDIM128 HDIM192 HDIM256 HDIMDIFF64 HDIMDIFF192 SOFTCAP SPLIT PAGEDKV LOCAL")

# switch -> the instantiation file names it makes unreachable ("" : none, the switch is in-kernel)
set(_VF_FA3_UNITS_FP16        "_fp16_")
set(_VF_FA3_UNITS_FP8         "_e4m3_")
set(_VF_FA3_UNITS_HDIM64      "^flash_fwd_hdim64_")        # with its hdim-diff (64_256, 64_512) units
set(_VF_FA3_UNITS_HDIM96      "^flash_fwd_hdim96_")
set(_VF_FA3_UNITS_HDIM128     "^flash_fwd_hdim128_")
set(_VF_FA3_UNITS_HDIM192     "^flash_fwd_hdim192_")       # with its hdim-diff (192_128) units
set(_VF_FA3_UNITS_HDIM256     "^flash_fwd_hdim256_")
set(_VF_FA3_UNITS_HDIMDIFF64  "^flash_fwd_hdim64_(256|512)_")
set(_VF_FA3_UNITS_HDIMDIFF192 "^flash_fwd_hdim192_128_")
set(_VF_FA3_UNITS_SOFTCAP     "_softcap")
set(_VF_FA3_UNITS_SPLIT       "_split")
set(_VF_FA3_UNITS_PAGEDKV     "_paged")
set(_VF_FA3_UNITS_LOCAL       "")

function(vllm_forge_fa3_trim target)
  get_target_property(_srcs ${target} SOURCES)
  set(_units "")
  foreach(_s IN LISTS _srcs)
    if(_s MATCHES "hopper/instantiations/flash_fwd_[^/]*\\.cu$")
      list(APPEND _units "${_s}")
    endif()
  endforeach()
  list(LENGTH _units _n_all)
  set(_defs "")
  set(_dropped "")
  foreach(_sw IN LISTS VLLM_FORGE_FA3_DISABLE)
    string(TOUPPER "${_sw}" _sw)
    if(NOT DEFINED _VF_FA3_UNITS_${_sw})
      message(FATAL_ERROR "VLLM_FORGE_FA3_DISABLE: unknown switch '${_sw}' -- use FP16 FP8 HDIM64 HDIM96 "
        "HDIM128 HDIM192 HDIM256 HDIMDIFF64 HDIMDIFF192 SOFTCAP SPLIT PAGEDKV LOCAL")
    endif()
    list(APPEND _defs FLASHATTENTION_DISABLE_${_sw})
    if(_VF_FA3_UNITS_${_sw})
      foreach(_u IN LISTS _units)
        get_filename_component(_name "${_u}" NAME)
        if(_name MATCHES "${_VF_FA3_UNITS_${_sw}}")
          list(APPEND _dropped "${_u}")
        endif()
      endforeach()
    endif()
  endforeach()
  list(REMOVE_DUPLICATES _dropped)
  list(LENGTH _dropped _n_dropped)
  math(EXPR _n_kept "${_n_all} - ${_n_dropped}")
  if(_defs)
    if(_n_kept EQUAL 0)
      message(FATAL_ERROR "VLLM_FORGE_FA3_DISABLE=${VLLM_FORGE_FA3_DISABLE} leaves no FA3 kernel unit -- keep at least one head dim")
    endif()
    target_compile_definitions(${target} PRIVATE ${_defs})
    list(REMOVE_ITEM _srcs ${_dropped})
    set_property(TARGET ${target} PROPERTY SOURCES ${_srcs})
    list(JOIN _defs " " _defs_text)
    message(STATUS "FA3 trimmed: ${_defs_text}")
  endif()
  set(_kept_names "")
  foreach(_u IN LISTS _units)
    if(NOT _u IN_LIST _dropped)
      get_filename_component(_name "${_u}" NAME)
      list(APPEND _kept_names "${_name}")
    endif()
  endforeach()
  list(SORT _kept_names)
  message(STATUS "FA3 kernel units: ${_n_kept} of ${_n_all}")
  if(_defs)
    list(JOIN _kept_names " " _kept_text)
    message(STATUS "FA3 kernel units kept: ${_kept_text}")
  endif()
endfunction()

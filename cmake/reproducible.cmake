# Bit-reproducible flash-attention extensions (VLLM_FORGE_FA_CUDA).
#
# Two clean builds of _vllm_fa3_C from the same sources differ, without this, only in names
# nvcc makes up per run: its host-side intermediate is tmpxft_<pid>_..._<unit>.cudafe1.cpp, and gcc
# records that name as the object's FILE symbol, which the linker copies into the module's .symtab
# (vLLM 0.22.1's own _vllm_fa3_C.abi3.so carries 198 of them, so it cannot be rebuilt bit for bit).
# sccache runs nvcc's steps itself under fixed names (x_0.cudafe1.cpp), so plain-nvcc and sccache
# objects differ there too. So:
#  * nvcc -frandom-seed=<unit path relative to the source tree>, per unit: nvcc's documented switch
#    for the random numbers it uses in generated symbol and variable names (also passed to gcc);
#  * -ffile-prefix-map=<source tree>=/vllm-flash-attn for the host compiler (host __FILE__; the
#    checkout's location otherwise shows in the module). The build tree is not mapped: nothing of it
#    reaches the objects, and a flag naming it would make every build tree's compile-cache keys
#    (sccache hashes the arguments) differ;
#  * links with --discard-all: no local symbols in the module's .symtab, the run-dependent FILE
#    symbols included (exported symbols, and so torch's op registration, are unchanged);
#    --build-id=sha1 (a hash of the contents: equal modules, equal ids).
# What stays: the unit's path inside the tree reaches nvcc's anonymous-namespace names, so the same
# tree at the same path (or the mapped paths) is assumed; toolchain and torch must be the same.
option(VLLM_FORGE_REPRODUCIBLE "Reproducibility flags for the flash-attention extensions" ON)

function(vllm_forge_reproducible target srcdir)
  if(NOT VLLM_FORGE_REPRODUCIBLE)
    return()
  endif()
  get_target_property(_srcs ${target} SOURCES)
  foreach(_s IN LISTS _srcs)
    if(_s MATCHES "\\.cu$")
      cmake_path(ABSOLUTE_PATH _s BASE_DIRECTORY "${srcdir}" NORMALIZE OUTPUT_VARIABLE _abs)
      file(RELATIVE_PATH _rel "${srcdir}" "${_abs}")
      set_property(SOURCE "${_abs}" DIRECTORY "${srcdir}" APPEND PROPERTY COMPILE_OPTIONS
        "$<$<COMPILE_LANGUAGE:CUDA>:-frandom-seed=${_rel}>")
    endif()
  endforeach()
  set(_map "-ffile-prefix-map=${srcdir}=/vllm-flash-attn")
  target_compile_options(${target} PRIVATE "$<$<COMPILE_LANGUAGE:CXX>:${_map}>"
                                           "$<$<COMPILE_LANGUAGE:CUDA>:-Xcompiler=${_map}>")
  target_link_options(${target} PRIVATE "LINKER:--build-id=sha1" "LINKER:--discard-all")
  message(STATUS "${target}: reproducibility flags (-frandom-seed per unit, -ffile-prefix-map, --discard-all, --build-id=sha1)")
endfunction()

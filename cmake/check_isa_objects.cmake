# Build check (run after pyqkern_core is built): an ISA folder's object files define no weak /
# COMDAT symbols. Such a symbol (an inline library function, a template instantiated with
# non-folder types) also exists in baseline-compiled code, the linker keeps one copy for the whole
# library, and if it keeps the one compiled with the folder's -m flags, CPUs without that ISA
# crash in baseline code. Arguments: -DNM=<nm> -DOBJECTS=<objects separated by |>.
string(REPLACE "|" ";" objects "${OBJECTS}")
set(found "")
foreach(obj IN LISTS objects)
  if(obj STREQUAL "")
    continue()
  endif()
  execute_process(COMMAND "${NM}" -C --defined-only "${obj}" OUTPUT_VARIABLE out RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "check_isa_objects: ${NM} failed on ${obj}")
  endif()
  string(REPLACE "\n" ";" lines "${out}")
  foreach(line IN LISTS lines)
    if(line MATCHES " [WVu] " AND NOT line MATCHES "DW\\.ref\\.__gxx_personality_v0")
      string(APPEND found "\n  ${obj}: ${line}")
    endif()
  endforeach()
endforeach()
if(found)
  message(FATAL_ERROR "weak (COMDAT) symbols in ISA-flagged objects; keep library templates out of "
                      "csrc/kernels/<isa>/ (use internal-linkage helpers, malloc, plain arrays):${found}")
endif()

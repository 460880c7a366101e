// The op namespace as a string, expanded from the namespace token itself: the CUDA emulation build renames the
// namespace with -Dtokenflow_ext=tokenflow_ext_emu, and dispatcher lookups of our own ops must then find its ops.
#pragma once

#define TFX_STRINGIFY(token) #token
#define TFX_OP_NAME(ns, op) TFX_STRINGIFY(ns) "::" op

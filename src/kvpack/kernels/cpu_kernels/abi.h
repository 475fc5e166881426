// kvpack CPU kernels: the one ABI version of the library (kernels/cpu.py reads it from here and checks the
// built library's kvpack_abi_version() against it). Bump it when any C signature or argument layout changes.
#pragma once
#define KVPACK_ABI_VERSION 28

// One kernel family (the file EMU_FAMILY_SOURCE names) for the emulated driver of
// emulated_driver.cpp, with its kernels registered by name from EMU_KERNEL_LIST, which
// scripts/emulated-gpu writes from the symbols of a first compile of this file.
#include "emulation.h"

#include EMU_FAMILY_SOURCE

#ifdef EMU_KERNEL_LIST
#include EMU_KERNEL_LIST
#endif
